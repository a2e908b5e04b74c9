"""budgetdiff.generation.engine.Generator: modes, grouping, seeds, concurrency, shipped policies, errors."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch

from budgetdiff.generation.bundle import BundleError, load_bundle
from budgetdiff.cli import main
from budgetdiff.generation.engine import MODES, GenerationRequest, Generator
from budgetdiff.errors import RequestError
from budgetdiff.methods.policy import PolicyError, SkipPolicy, load_skip_policy

PROMPTS = ["a small red circle at the top left on a white background",
           "a large blue square in the center and a small green triangle at the bottom right on a black background",
           "a medium yellow star at the bottom left on a gray background"]


def images_of(results) -> np.ndarray:
    return np.stack([np.asarray(r.image) for r in results])


def test_every_mode_runs_and_records_what_it_did(tiny_generator, tiny_bundle_dir):
    results = tiny_generator([GenerationRequest(PROMPTS[0], mode=m, seed=4) for m in MODES], output_type="np")
    assert [r.record.mode for r in results] == list(MODES)
    policy = load_skip_policy(tiny_bundle_dir / "skip_policy.json")
    for r in results:
        rec = r.record.to_dict()
        assert r.image.shape == (16, 16, 3) and np.isfinite(r.image).all()
        for key in ("steps", "nfe", "skipped", "scheduler", "guidance", "seed", "seconds", "model", "policy"):
            assert key in rec, (rec["mode"], key)
        assert rec["seed"] == 4 and rec["nfe"] == rec["steps"] - rec["skipped"]
        assert rec["policy"]["bundle"]["sha256"] == load_bundle(tiny_bundle_dir).sha256
        per_eval = tiny_generator.gflops_per_evaluation[(rec["model"]["name"], rec["cfg"])]
        assert rec["unet_gflops"] == pytest.approx(rec["nfe"] * per_eval, rel=1e-3)
    full, budget, adaptive, student, auto = (r.record.to_dict() for r in results)
    assert full["steps"] == 20 and full["nfe"] == 20 and full["model"]["name"] == "base"
    assert full["skip_mask"] is None and full["policy"]["skip"] is None
    assert budget["steps"] == budget["budget"]["chosen_steps"] and budget["policy"]["budget"]["rule"]["name"] == "plateau"
    skip = adaptive["policy"]["skip"]
    assert skip["point"] == policy.for_scheduler("ddim").default and skip["sha256"] == policy.sha256
    assert len(adaptive["skip_mask"]) == 20 and adaptive["nfe"] < 20
    assert student["model"]["name"] == "student" and student["steps"] == 4 and student["guidance"] == 2.0
    assert auto["policy"]["auto"]["route"] in ("student", "base+skip")
    assert full["model"]["unet_sha256"] != student["model"]["unet_sha256"]
    per_eval = tiny_generator.gflops_per_evaluation
    assert per_eval[("base", True)] == pytest.approx(2 * per_eval[("base", False)], rel=0.01)  # the CFG pair


def test_auto_routes_by_the_predicted_budget(tiny_bundle_dir):
    gen = Generator.load(tiny_bundle_dir)
    chosen = gen.plan([GenerationRequest(PROMPTS[1], mode="budget")])[0].steps
    gen.auto_student_max_steps = chosen  # the budget is within the student's reach
    plan = gen.plan([GenerationRequest(PROMPTS[1], mode="auto")])[0]
    assert plan.model == "student" and plan.guidance == 1.0 and plan.route.route == "student"
    gen.auto_student_max_steps = chosen - 1  # beyond it: the base at the budget, with skipping
    plan = gen.plan([GenerationRequest(PROMPTS[1], mode="auto")])[0]
    assert plan.model == "base" and plan.steps == chosen and plan.skip is not None
    assert plan.route.route == "base+skip"


def test_quality_target_chooses_the_skip_point(tiny_generator):
    plan = lambda q: tiny_generator.plan([GenerationRequest(PROMPTS[0], mode="adaptive", quality_target=q)])[0]
    # tiny policy: delta=0.05 has quality 0.995, delta=0.5 quality 0.95 (and the larger speed-up)
    assert plan(0.9).skip.threshold == 0.5
    assert plan(0.99).skip.threshold == 0.05
    assert plan(0.999).skip.threshold == 0.05  # none reaches it: the most conservative point
    assert plan(None).skip.threshold == 0.5  # the default point


def test_requests_of_any_plan_share_unet_calls_and_keep_their_order(tiny_generator):
    """Through the step scheduler, images of different plans (steps, models) share UNet calls
    up to the row budget, and results come back in request order."""
    from budgetdiff.generation.continuous import StepBatchConfig, StepBatcher

    batcher = StepBatcher(StepBatchConfig(max_rows=4, max_inflight=4))
    calls = []
    batcher.observers.append(lambda event, data: calls.append(data) if event == "call" else None)
    requests = [GenerationRequest(PROMPTS[i % 3], mode=m, seed=i, steps=s)
                for i, (m, s) in enumerate([("full", 6), ("student", None), ("full", 9), ("student", None),
                                            ("full", 6)])]
    results = tiny_generator.run_batched(batcher, requests, "np")
    assert [r.record.seed for r in results] == [0, 1, 2, 3, 4]
    assert [r.record.mode for r in results] == ["full", "student", "full", "student", "full"]
    assert [r.record.steps for r in results] == [6, 4, 9, 4, 6]
    assert calls and max(c["rows"] for c in calls) <= 4
    assert {c["model"] for c in calls} == {"base", "student"}
    # the 6-step and 9-step images shared calls; every image took one evaluation per step
    assert max(c["images"] for c in calls if c["model"] == "base") == 2
    assert sum(c["images"] for c in calls) == 6 + 4 + 9 + 4 + 6
    assert results[2].record.batch_size == 2 and results[2].record.mean_call_images > 1


def test_a_request_reproduces_bit_for_bit_alone_or_in_a_batch(tiny_generator):
    """The delivered 8-bit image is bit-for-bit the same alone or in a batch. The float arrays
    agree to ~1e-6: CPU GEMM kernels block their sums by batch size."""
    requests = [GenerationRequest(p, mode=m, seed=10 + i) for i, (p, m) in
                enumerate(zip(PROMPTS * 2, ["adaptive", "adaptive", "full", "auto", "student", "budget"]))]
    batched = tiny_generator(requests)
    for request, result in zip(requests, batched):
        alone = tiny_generator([request])[0]
        assert np.array_equal(np.asarray(alone.image), np.asarray(result.image)), request.mode
        assert alone.record.skip_mask == result.record.skip_mask
        assert alone.record.steps == result.record.steps and alone.record.batch_size == 1


def test_two_threads_on_one_generator_match_sequential_calls(tiny_generator):
    a = [GenerationRequest(p, mode="adaptive", seed=i, scheduler="dpmpp") for i, p in enumerate(PROMPTS)]
    b = [GenerationRequest(p, mode="full", seed=7 + i, scheduler="euler", steps=12) for i, p in enumerate(PROMPTS)]
    expected = [images_of(tiny_generator(a, output_type="np")), images_of(tiny_generator(b, output_type="np"))]
    got: dict[int, np.ndarray] = {}
    errors = []

    def work(k, requests):
        try:
            for _ in range(2):
                got[k] = images_of(tiny_generator(requests, output_type="np"))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k, r)) for k, r in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])


def test_the_pipeline_keeps_no_state_between_calls(tiny_generator):
    pipe = tiny_generator.models["base"].pipe
    scheduler = pipe.scheduler
    first = tiny_generator([GenerationRequest(PROMPTS[0], mode="adaptive", seed=1, scheduler="dpmpp")], output_type="np")
    tiny_generator([GenerationRequest(PROMPTS[1], mode="full", seed=2, scheduler="euler", steps=5)])
    again = tiny_generator([GenerationRequest(PROMPTS[0], mode="adaptive", seed=1, scheduler="dpmpp")], output_type="np")
    assert pipe.scheduler is scheduler  # never replaced by a call
    assert np.array_equal(first[0].image, again[0].image)
    assert first[0].record.skip_mask == again[0].record.skip_mask


@pytest.mark.parametrize("kwargs, field", [
    ({"mode": "fast"}, "mode"),
    ({"mode": "student", "steps": 8}, "steps"),
    ({"mode": "auto", "steps": 8}, "steps"),
    ({"mode": "full", "steps": 0}, "steps"),
    ({"mode": "budget", "quality_target": 0.0}, "quality_target"),
    ({"mode": "auto", "quality_target": 1.5}, "quality_target"),
    ({"mode": "auto", "quality_target": float("nan")}, "quality_target"),
    ({"mode": "full", "quality_target": 0.9}, "quality_target"),
    ({"mode": "full", "scheduler": "heun"}, "scheduler"),
    ({"mode": "student", "scheduler": "euler"}, "scheduler"),
    ({"mode": "full", "guidance": float("inf")}, "guidance"),
    ({"mode": "full", "seed": -1}, "seed"),
    ({"mode": "full", "prompt": "  "}, "prompt"),
])
def test_bad_requests_name_the_field(tiny_generator, kwargs, field):
    """A request's own fields are checked when it is made; what the bundle supports, when it runs.
    Either way the error carries its field as data."""
    kwargs = {"prompt": PROMPTS[0], **kwargs}
    with pytest.raises(RequestError) as info:
        tiny_generator([GenerationRequest(**kwargs)])
    assert info.value.field == field and str(info.value).startswith(f"{field}:"), info.value


def test_a_request_is_checked_once_when_made(tiny_generator, monkeypatch):
    """Generating does not validate a request again: only what the models support is checked."""
    request = GenerationRequest(PROMPTS[0], mode="full", steps=2, seed=1)
    calls = []
    monkeypatch.setattr(GenerationRequest, "validate", lambda self: calls.append(self))
    copies = [request.for_image(i, f"r/{i}") for i in range(3)]
    assert [c.seed for c in copies] == [1, 2, 3] and copies[2].request_id == "r/2"
    tiny_generator(copies)
    assert calls == []


def test_a_bad_request_in_a_list_names_its_position(tiny_generator):
    with pytest.raises(RequestError, match=r"^scheduler: .*\(request 1\)$") as info:
        tiny_generator([GenerationRequest(PROMPTS[0], mode="full"),
                        GenerationRequest(PROMPTS[0], mode="student", scheduler="euler")])
    assert (info.value.field, info.value.index) == ("scheduler", 1)


def test_a_budget_model_for_another_unet_is_refused(tiny_bundle_dir, tmp_path):
    copy = tmp_path / "models"
    shutil.copytree(tiny_bundle_dir.parent, copy)
    weights = next((copy / "base" / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x03")
    with pytest.raises(BundleError, match=r"^budget: .*trained for model"):
        Generator.load(copy / "bundle")


def test_bundle_errors_are_one_line(tiny_bundle_dir, tmp_path):
    copy = tmp_path / "models"
    shutil.copytree(tiny_bundle_dir.parent, copy)
    (copy / "bundle" / "skip_policy.json").write_text('{"format": "other"}')
    with pytest.raises(BundleError, match="skip policy"):
        load_bundle(copy / "bundle")
    shutil.rmtree(copy / "student")
    with pytest.raises(BundleError, match="student .* does not exist"):
        load_bundle(copy / "bundle")
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_skip_policy_round_trip_and_errors(tmp_path):
    from tests.conftest import tiny_skip_policy

    policy = tiny_skip_policy()
    policy.save(tmp_path / "p.json")
    loaded = load_skip_policy(tmp_path / "p.json")
    assert loaded.to_dict() == policy.to_dict() and loaded.sha256 == policy.sha256
    raw = policy.to_dict()
    raw["schedulers"]["ddim"]["default"] = "delta=9"
    with pytest.raises(PolicyError, match="default 'delta=9'"):
        SkipPolicy.from_dict(raw)
    raw = policy.to_dict()
    raw["schedulers"]["ddim"]["points"][0]["threshold"] = -1
    with pytest.raises(PolicyError, match="threshold"):
        SkipPolicy.from_dict(raw)


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------
def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_adaptive_uses_the_shipped_policy(tiny_bundle_dir, tiny_generator, tmp_path, capsys):
    code, out, err = run_cli(["generate", PROMPTS[0], "--bundle", str(tiny_bundle_dir), "--adaptive", "--seed", "3",
                              "--out", str(tmp_path / "a.png")], capsys)
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    engine = tiny_generator([GenerationRequest(PROMPTS[0], mode="adaptive", seed=3)])[0].record.to_dict()
    assert record["mode"] == "adaptive" and record["policy"]["skip"]["point"] == "delta=0.5"
    assert record["skip_mask"] == engine["skip_mask"] and record["nfe"] == engine["nfe"] < 20
    code, out, err = run_cli(["generate", PROMPTS[0], "--bundle", str(tiny_bundle_dir), "--adaptive", "--seed", "3",
                              "--threshold", "0", "--out", str(tmp_path / "b.png")], capsys)
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    assert record["nfe"] == 20 and record["policy"]["skip"]["point"] == "explicit"


@pytest.mark.parametrize("args, flag", [
    (["--mode", "fast"], "--mode"),
    (["--mode", "student", "--steps", "8"], "--steps"),
    (["--mode", "auto", "--quality-target", "2"], "--quality-target"),
    (["--mode", "student", "--scheduler", "euler"], "--scheduler"),
    (["--mode", "full", "--adaptive"], "--adaptive"),
    (["--mode", "auto", "--threshold", "0.1"], "--threshold"),
])
def test_cli_bad_requests_exit_2_with_one_line(tiny_bundle_dir, tmp_path, capsys, args, flag):
    code, _, err = run_cli(["generate", PROMPTS[0], "--bundle", str(tiny_bundle_dir), *args,
                            "--out", str(tmp_path / "x.png")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {flag}:"), err


def test_cli_modes_and_a_missing_bundle(tiny_bundle_dir, tmp_path, capsys):
    for mode in MODES:
        code, out, err = run_cli(["generate", PROMPTS[2], "--bundle", str(tiny_bundle_dir), "--mode", mode,
                                  "--out", str(tmp_path / f"{mode}.png")], capsys)
        assert code == 0, err
        assert json.loads(out.strip().splitlines()[-1])["mode"] == mode
    code, _, err = run_cli(["generate", PROMPTS[2], "--bundle", str(tmp_path / "none"), "--out",
                            str(tmp_path / "x.png")], capsys)
    assert code == 2 and err.startswith("error: --bundle:") and len(err.strip().splitlines()) == 1


def test_cli_batch_writes_records_and_resumes(tiny_bundle_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,seed,mode\n" + "\n".join(f'"{p}",{40 + i},{m}' for i, (p, m) in
                                                      enumerate(zip(PROMPTS, ["full", "student", "auto"]))) + "\n")
    out_dir = tmp_path / "out"
    args = ["batch", str(prompts), "--out-dir", str(out_dir), "--bundle", str(tiny_bundle_dir), "--batch-size", "2"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["generated"] == 3
    # one record per image as it finishes (step-level batching: the 4-step student finishes first)
    records = sorted((json.loads(line) for line in (out_dir / "records.jsonl").read_text().splitlines()),
                     key=lambda r: r["image"])
    assert [r["mode"] for r in records] == ["full", "student", "auto"] and [r["seed"] for r in records] == [40, 41, 42]
    assert all((out_dir / r["image"]).is_file() for r in records)
    (out_dir / records[1]["image"]).unlink()  # as if interrupted before this image was written
    code, out, err = run_cli(args, capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["generated"] == 1
    code, out, err = run_cli(args, capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["generated"] == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,mode\nhello,fast\n")
    code, _, err = run_cli(["batch", str(bad), "--out-dir", str(tmp_path / "o2"), "--bundle", str(tiny_bundle_dir)],
                           capsys)
    assert code == 2 and "--mode" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# Overriding a part of the bundle: the calibrated auto policy is kept where it holds
# ------------------------------------------------------------------------------------------------
def test_model_and_budget_model_overrides_keep_the_calibrated_auto_policy(tiny_bundle_dir, tmp_path, capsys):
    """``--model`` / ``--budget-model`` with the parts the policy was calibrated with keep it (no
    silent fallback to the older rule); another predictor keeps it too, and a route that uses the
    predictor says in its record that its measurement was made with the bundle's."""
    from tests.test_auto_policy import bundle_with_policy

    bundle = bundle_with_policy(tiny_bundle_dir, tmp_path / "bundle")
    sha = load_bundle(bundle).auto.policy.sha256
    base_copy, budget_copy = tmp_path / "base-copy", tmp_path / "budget-copy"
    shutil.copytree(tiny_bundle_dir.parent / "base", base_copy)  # the same weights at another path
    shutil.copytree(tiny_bundle_dir.parent / "budget", budget_copy)

    def auto_record(*flags):
        code, out, err = run_cli(["generate", PROMPTS[0], "--bundle", str(bundle), "--mode", "auto", "--seed", "1",
                                  "--out", str(tmp_path / "x.png"), *flags], capsys)
        assert code == 0, err
        return json.loads(out.strip().splitlines()[-1])["policy"]["auto"]

    for flags in ([], ["--model", str(base_copy)], ["--budget-model", str(budget_copy)],
                  ["--model", str(base_copy), "--budget-model", str(budget_copy)]):
        auto = auto_record(*flags)
        assert auto["policy"]["sha256"] == sha and auto["route"] == "base@3", flags  # the policy's default
        assert "rule" not in auto and "calibration" not in auto, flags

    config = json.loads((budget_copy / "config.json").read_text())
    (budget_copy / "config.json").write_text(json.dumps({**config, "retrained": "elsewhere"}))  # another predictor
    gen = Generator.from_bundle(bundle, budget_model=budget_copy)
    budget_route, uniform_route = (r.record.route for r in gen([GenerationRequest(PROMPTS[0], quality_target=0.85),
                                                               GenerationRequest(PROMPTS[0])]))
    assert budget_route.policy["sha256"] == sha and budget_route.route.startswith("budget")
    assert budget_route.calibration["policy_applied"] and not budget_route.calibration["measured_holds"]
    assert "budget predictor was replaced" in budget_route.calibration["why"]
    assert uniform_route.route == "base@3" and uniform_route.calibration is None


def test_another_base_model_sets_the_calibrated_policy_aside_and_says_why(tiny_bundle_dir, tmp_path):
    """A base model with other UNet weights was never calibrated: auto routes by the bundle's rule,
    and every auto record names why."""
    from tests.conftest import make_tiny_predictor
    from tests.test_auto_policy import bundle_with_policy

    bundle = bundle_with_policy(tiny_bundle_dir, tmp_path / "bundle")
    other = tiny_bundle_dir.parent / "student"  # a BudgetDiffusionPipeline with other UNet weights
    with pytest.raises(RequestError, match="^mode: auto needs a budget predictor: the bundle's budget predictor "
                                           "does not fit this base model"):
        Generator.from_bundle(bundle, model=other)([GenerationRequest(PROMPTS[0])])
    predictor = make_tiny_predictor(other, tmp_path / "budget-for-other")
    gen = Generator.from_bundle(bundle, model=other, budget_model=predictor)
    record = gen([GenerationRequest(PROMPTS[0], seed=2)])[0].record.to_dict()
    auto = record["policy"]["auto"]
    assert auto["route"] in ("student", "base+skip") and auto["rule"]["student_max_steps"] == 8
    assert auto["calibration"]["policy_applied"] is False
    assert "not the one the auto policy was calibrated with" in auto["calibration"]["why"]
    assert record["model"]["path"] == str(other.resolve()) or record["model"]["name"] == "student"
