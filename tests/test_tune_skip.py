"""training/tune_skip/: Ray Tune + Optuna over the skip settings, on the tiny components.

The tuning tests share one private local Ray (module fixture); the params are synthetic, chosen
so that the behaviour checked does not depend on what the tiny random models happen to do.
"""

from __future__ import annotations

import json

import pytest
import yaml

from training.tune_skip import main, tune
from training.tune_skip.confirm import confirm_candidates, confirm_choice
from training.tune_skip.report import seconds_all_phases
from training.tune_skip.search import hypervolume, pareto_front, select_points

PROMPTS = {1: 1, 2: 1}


def base_cfg(model, tmp_path, **over) -> dict:
    cfg = {
        "model": str(model),
        "clip_dir": str(tmp_path / "no_clip"),  # missing: quality from pixel SSIM and LPIPS only
        "schedulers": ["ddim"],
        "steps": 12,
        "guidance": None,
        "seed_offset": 93000000,
        "prompts_per_level": PROMPTS,
        "search_space": {"threshold_min": 2.0, "threshold_max": 4.0, "max_skip_min": 6, "max_skip_max": 8,
                         "reuse": ["epsilon", "sample"], "warmup_min": 4, "warmup_max": 5},
        "searches": ["optuna"],
        "num_samples": 4,
        "optuna_startup_trials": 2,
        "seed": 0,
        "cpus_per_trial": 1,
        "max_concurrent": 2,
        "ray_num_cpus": 2,
        "baseline": {"threshold": 0.5, "max_skip": 2, "warmup": 4, "reuse": "epsilon"},
        "baseline_report": None,
        "selection": {"loss_ratio": 1.0, "quality_levels": [0.99, 0.5]},
        "holdout": None,
        "work_dir": str(tmp_path / "work"),
        "report_path": str(tmp_path / "reports/tune_skip.json"),
        "plot_path": str(tmp_path / "reports/tune_skip_pareto.png"),
        "policy_path": str(tmp_path / "models/skip_policy/skip_policy.json"),
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def private_ray():
    """One private local Ray for the module's tunings (tune() leaves a Ray it did not start running)."""
    import os

    import ray

    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_worker_niceness", "0")  # as tune_skip.search.start_ray: not starved on a busy machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


# ------------------------------------------------------------------------------------------
# Bad params: one line, exit 2, before Ray starts
# ------------------------------------------------------------------------------------------
BAD = [
    ({"search_space.threshold_min": -0.1}, "threshold_min"),
    ({"search_space.threshold_min": 0.0}, "threshold_min"),
    ({"search_space.threshold_min": 0.5, "search_space.threshold_max": 0.1}, "threshold_min"),
    ({"search_space.max_skip_min": 5, "search_space.max_skip_max": 3}, "max_skip_min"),
    ({"search_space.warmup_min": 2}, "warmup_min"),
    ({"search_space.reuse": ["epsilon", "latent"]}, "reuse"),
    ({"schedulers": ["ddim", "heun"]}, "schedulers"),
    ({"searches": ["optuna", "hyperband"]}, "searches"),
    ({"num_samples": 0}, "num_samples"),
    ({"model": "/nonexistent/model"}, "model"),
]


@pytest.mark.parametrize("change,key", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_params_give_one_line_error_before_ray_starts(change, key, tiny_model_dir, tmp_path, monkeypatch, capsys):
    import ray

    was_running = ray.is_initialized()

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start on bad params")

    monkeypatch.setattr(ray, "init", no_ray)
    cfg = base_cfg(tiny_model_dir, tmp_path)
    for dotted, value in change.items():
        *parents, last = dotted.split(".")
        target = cfg
        for p in parents:
            target = target[p]
        target[last] = value
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tune_skip": cfg}))
    with pytest.raises(SystemExit) as exc:
        main(["--params", str(params)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and key in err, err
    assert ray.is_initialized() == was_running
    assert not (tmp_path / "reports").exists()


# ------------------------------------------------------------------------------------------
# Pure parts: front, hypervolume, selection rule
# ------------------------------------------------------------------------------------------
def pts(*pairs, quality=None):
    return [{"trial_id": f"t{i}", "nfe": n, "lpips": l, "quality": (quality or {}).get(i, 1 - l),
             "config": {"threshold": 0.1, "max_skip": 4, "warmup": 4, "reuse": "epsilon"}}
            for i, (n, l) in enumerate(pairs)]


def test_pareto_front_and_hypervolume():
    points = pts((10, 0.5), (20, 0.2), (15, 0.6), (30, 0.1), (25, 0.3))
    front = pareto_front(points)
    assert [(p["nfe"], p["lpips"]) for p in front] == [(10, 0.5), (20, 0.2), (30, 0.1)]
    # staircase below (50, 1): (50-10)*(1-.5) + (50-20)*(.5-.2) + (50-30)*(.2-.1)
    assert hypervolume(points, (50, 1.0)) == pytest.approx(20 + 9 + 2)
    assert hypervolume(front, (50, 1.0)) == pytest.approx(hypervolume(points, (50, 1.0)))
    assert hypervolume([], (50, 1.0)) == 0.0
    assert hypervolume(pts((60, 0.1)), (50, 1.0)) == 0.0


def test_selection_rule():
    front = pareto_front(pts((12, 0.5), (16, 0.2), (20, 0.05), (40, 0.01)))
    # dominating points of baseline (20, 0.3): (16, .2) gains min(20/16-1, .3/.2-1)=.25; (20, .05): min(0, 5)=0
    sel = select_points(front, {"nfe": 20, "lpips": 0.3}, {"loss_ratio": 1.0, "quality_levels": [0.9, 0.99]})
    assert (sel["default"]["nfe"], sel["default"]["lpips"]) == (16, 0.2) and "dominates" in sel["why"]
    assert sel["levels"][0.9]["nfe"] == 20 and sel["levels"][0.99]["nfe"] == 40
    # nothing dominates (baseline faster than every point at its loss): fewest NFE at no more loss
    sel = select_points(front, {"nfe": 10, "lpips": 0.1}, {})
    assert sel["default"]["nfe"] == 20 and "no front point dominates" in sel["why"]
    # a stricter loss_ratio moves the default towards quality
    sel = select_points(front, {"nfe": 20, "lpips": 0.3}, {"loss_ratio": 0.1})
    assert sel["default"]["nfe"] == 40
    assert select_points(front, None, {})["default"]["lpips"] == 0.01


def test_confirmation_candidates_and_choice():
    trials = [{"trial_id": f"t{i}", "config": {"threshold": th, "max_skip": 4, "warmup": 4, "reuse": "sample"},
               "nfe": n, "lpips": lp, "quality": 0.9} for i, (th, n, lp) in
              enumerate([(0.1, 18, 0.3), (0.5, 13, 0.2), (0.3, 16, 0.1), (0.9, 10, 0.5), (0.05, 30, 0.05)])]
    base = {"config": _cfg(0.1), "nfe": 18, "lpips": 0.3}
    front = pareto_front(trials)
    # the baseline itself is not a candidate; points that lose on either objective are not either
    cands = confirm_candidates(front, base, {"confirm": {"candidates": 3}})
    # margins: t1 min(18/13 - 1, .3/.2 - 1) = .385, t2 min(18/16 - 1, .3/.1 - 1) = .125
    assert [c["trial_id"] for c in cands] == ["t1", "t2"]
    assert confirm_candidates(front, base, {"confirm": {"candidates": 1}}) == cands[:1]
    assert confirm_candidates(front, base, {"loss_ratio": 0.4, "confirm": {}}) == [trials[2]]
    # on the confirmation prompts: the one that still beats the baseline by the largest margin ships
    rows = {"baseline": {"nfe": 18.0, "lpips": 0.30}, "t1": {"nfe": 13.0, "lpips": 0.35},
            "t2": {"nfe": 16.0, "lpips": 0.25}}
    assert confirm_choice(rows)[0] == "t2"
    rows["t2"]["lpips"] = 0.31  # a lucky draw on the tuning prompts: the baseline ships
    pick, why = confirm_choice(rows)
    assert pick == "baseline" and "baseline ships" in why
    rows["t2"]["lpips"] = 0.40
    assert confirm_choice(rows, ratio=1.2)[0] == "t1"  # a looser loss ratio admits t1 (0.35 <= 1.2 x 0.30)


def _cfg(th):
    return {"threshold": th, "max_skip": 4, "warmup": 4, "reuse": "sample"}


# ------------------------------------------------------------------------------------------
# A 4-trial tuning on the tiny components
# ------------------------------------------------------------------------------------------
@pytest.mark.integration  # a private Ray and 4 trials: about 1.5 minutes here (`make test-integration`)
def test_tuning_writes_a_policy_that_changes_adaptive_generation(private_ray, tiny_bundle_dir, tiny_components,
                                                                 tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from budgetdiff.generation.engine import GenerationRequest, Generator
    from budgetdiff.methods.policy import load_skip_policy
    from conftest import make_tiny_pipe, tiny_skip_policy

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    base = (tiny_bundle_dir / "../base").resolve()
    hold = {"seed_offset": 90000000, "prompts_per_level": {1: 1}, "batch_size": 4,
            "targets": {"nfe_speedup": {"ddim": 1.0}}}
    # the confirmation step: a loss_ratio this loose makes every front point with fewer NFE than the
    # baseline (δ 0.5, C_max 2: far fewer skips than δ >= 2, C_max >= 6) a candidate, on both prompt sets
    selection = {"loss_ratio": 1000.0, "quality_levels": [0.99, 0.5],
                 "confirm": {"seed_offset": 94000000, "prompts_per_level": {1: 1}, "candidates": 2}}
    cfg = base_cfg(base, tmp_path, holdout=hold, selection=selection)
    report = tune(cfg)

    # the policy file loads and holds the tuned points, each within the search space
    policy = load_skip_policy(cfg["policy_path"])
    assert policy.source["stage"] == "tune_skip" and policy.steps == 12 and set(policy.schedulers) == {"ddim"}
    sched = policy.for_scheduler("ddim")
    default = sched.point()
    for p in sched.points:
        c = p.config
        assert 2.0 <= c.threshold <= 4.0 and 6 <= c.max_skip <= 8 and 4 <= c.warmup <= 5
        assert c.reuse in ("epsilon", "sample")
        assert {"quality", "nfe_speedup", "mean_nfe"} <= set(p.measured)
        assert p.measured["nfe_speedup"] == pytest.approx(12 / p.measured["mean_nfe"], rel=1e-3)
    # the default is the rule's choice from the front
    res = report["schedulers"]["ddim"]
    assert len(res["searches"]["optuna"]["trials"]) == 4
    conf = res["confirm"]
    assert conf["candidates"] and set(conf["rows"]) == {"baseline", *conf["candidates"]}
    assert conf["prompts"]["count"] == 1 and conf["chosen"] == confirm_choice(conf["rows"], 1000.0)[0]
    assert conf["chosen"] != "baseline" and res["chosen"]["default"]["trial_id"] == conf["chosen"]
    assert res["chosen"]["default"]["trial_id"] in {p["trial_id"] for p in res["pareto_front"]}
    assert default.config.threshold == pytest.approx(res["chosen"]["default"]["threshold"])

    # ... and changes what adaptive generation does, against policy A (tiny_skip_policy: δ 0.5, C_max 2)
    pipe = make_tiny_pipe(tiny_components)
    request = [GenerationRequest("a small red circle at the top left", mode="adaptive", steps=12, seed=s,
                                 scheduler="ddim") for s in range(3)]
    a = Generator(pipe, skip_policy=tiny_skip_policy())(request, output_type="pt")
    b = Generator(pipe, skip_policy=policy)(request, output_type="pt")
    assert all(r.record.skip_config["threshold"] == default.config.threshold for r in b)
    masks_a, masks_b = [r.record.skip_mask for r in a], [r.record.skip_mask for r in b]
    assert masks_a != masks_b
    # C_max >= 6 and δ >= 2 skip more than C_max 2 at δ 0.5
    assert sum(r.record.nfe for r in b) < sum(r.record.nfe for r in a)

    # report, plot, held-out check
    saved = json.loads((tmp_path / "reports/tune_skip.json").read_text())
    assert saved["complete"] and saved["policy"]["sha256"] == policy.sha256
    assert (tmp_path / "reports/tune_skip_pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert set(saved["schedulers"]["ddim"]["baselines_tuning"]) == {"hand", "paper"}
    h = saved["schedulers"]["ddim"]["holdout"]
    assert h["prompts"]["count"] == 1 and h["rows"]["tuned"]["nfe"] <= 12 and h["hand"] is None

    # MLflow: one parent run, every trial a child run with its config and objectives
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name("budgetdiff")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mlflow.parentRunId") is None]
    assert len(parents) == 1 and parents[0].data.tags["dvc_stage"] == "tune_skip"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 4
    for c in children:
        assert {"nfe", "lpips", "quality"} <= set(c.data.metrics) and {"threshold", "max_skip"} <= set(c.data.params)
        assert c.data.tags["scheduler"] == "ddim" and c.data.tags["search"] == "optuna"
    artifacts = {f.path for f in client.list_artifacts(parents[0].info.run_id)}
    assert {"skip_policy.json", "tune_skip.json", "tune_skip_pareto.png", "pareto_front.json"} <= artifacts

    # a rerun resumes from the checkpoints: same trials, no new search
    again = tune(cfg)
    assert again["schedulers"]["ddim"]["searches"]["optuna"]["trials"] == res["searches"]["optuna"]["trials"]


@pytest.mark.integration
def test_tunes_a_stock_sd_pipeline_with_the_random_ablation(private_ray, tiny_sd_dir, tmp_path, monkeypatch):
    from budgetdiff.methods.policy import load_skip_policy

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = base_cfg(tiny_sd_dir, tmp_path, steps=8, num_samples=2, searches=["optuna", "random"],
                   prompts_per_level={1: 2}, schedulers=["euler"])
    report = tune(cfg)
    assert report["model_class"] == "StableDiffusionPipeline" and report["guidance"] == 7.5
    policy = load_skip_policy(cfg["policy_path"])
    assert set(policy.schedulers) == {"euler"}
    ab = report["schedulers"]["euler"]["ablation"]
    assert ab["optuna"]["trials"] == ab["random"]["trials"] == 2
    assert len(ab["optuna"]["hypervolume_by_trial"]) == 2 and ab["optuna"]["hypervolume"] >= 0
    assert isinstance(ab["optuna_beats_random"], bool)


def test_seconds_all_phases_counts_resumed_phases_too():
    report = {"schedulers": {
        "ddim": {"reference_seconds": 10.0,
                 "searches": {"optuna": {"wall_seconds": 100.0}, "random": {"wall_seconds": 50.0}},
                 "replicates": {"1": {"optuna": {"wall_seconds": 20.0}}},
                 "confirm": {"reference_seconds": 5.0, "rows": {"baseline": {"seconds": 1.0}, "t1": {"seconds": 2.0}}},
                 "holdout": {"reference_seconds": 7.0, "rows": {"tuned": {"seconds": 3.0}}}},
        "euler": {"reference_seconds": 1.0, "searches": {"optuna": {"wall_seconds": 4.0}},
                  "confirm": {"candidates": [], "chosen": "x"}}}}
    assert seconds_all_phases(report) == {"references": 11.0, "searches": 174.0, "confirmation": 8.0,
                                             "holdout": 10.0, "total": 203.0}
