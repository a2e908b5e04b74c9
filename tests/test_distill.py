"""SnapFusion step distillation (training/distill.py) on tiny random models."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMScheduler

from conftest import REPO, TINY_RESOLUTION, tiny_unet_config

PROMPTS = ["a small red circle at the top left on a white background",
           "two large blue squares at the left and in the top right on a black background",
           "a small green cross in the center on a gray background"]


def tiny_v_unet(seed: int = 0):
    from training.base import build_unet

    torch.manual_seed(seed)
    return build_unet(tiny_unet_config(), TINY_RESOLUTION).eval()


def distill_config(teacher, tmp_path, **overrides):
    """params.yaml's distill_16 run, shrunk, as the typed config ``train`` takes."""
    from mlops.params import config_from_dict
    from training.distill import DistillConfig

    cfg = {**yaml_section("distill"), **yaml_section("distill_16")}
    cfg.update(teacher=str(teacher), student_steps=4, batch_size=2, max_steps=2, lr_warmup_steps=1, val_every=2,
               val_prompts=2, guidance_candidates=[1.0, 2.0], guidance_eval_prompts=2, heldout_loss_scenes=3,
               checkpoint_every=1,
               checkpoint_dir=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "student"),
               metrics_path=str(tmp_path / "distill.json"), stage="distill_test")
    cfg.update(overrides)
    return config_from_dict(DistillConfig, cfg)


def yaml_section(name: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / "params.yaml").read_text())[name]


@pytest.fixture(scope="module")
def module(tiny_model_dir, tmp_path_factory):
    from training.distill import DistillationModule

    torch.manual_seed(0)
    return DistillationModule(distill_config(tiny_model_dir, tmp_path_factory.mktemp("distill")))


def fixed_batch(n: int = 4, resolution: int = 16):
    from training.base import SceneStream
    from training.batches import stack_columns

    stream = iter(SceneStream(0, resolution, [0.4, 0.3, 0.2, 0.1]))
    return stack_columns([next(stream) for _ in range(n)])


# ----------------------------------------------------------------------------------------------
# Grids and the algebra of the target
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [8, 16])
def test_step_grid_is_the_inference_grid(n):
    from training.distill import step_grid

    config = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").config
    grid = step_grid(config, n)
    inference = DDIMScheduler.from_config(config, timestep_spacing="trailing")
    inference.set_timesteps(n)
    assert torch.equal(grid.t, inference.timesteps)  # the student trains where it samples
    assert torch.equal(grid.t_next, inference.timesteps - 1000 // n)  # where DDIMScheduler.step lands
    inference.set_timesteps(2 * n)
    assert torch.equal(grid.t_mid, inference.timesteps[1::2])  # the teacher's own 2N-step grid
    assert grid.t[0] == 999 and grid.t_next[-1] == -1
    if n == 8:
        assert grid.t.tolist() == [999, 874, 749, 624, 499, 374, 249, 124]
        assert grid.t_mid.tolist()[:2] == [937, 811]


def _teacher_outputs(unet, z, t, emb_seed=0):
    """A tiny UNet's v-prediction for z at t, conditioned on fixed random text embeddings."""
    from budgetdiff.text import PromptEmbeddings
    from conftest import TINY_TEXT_DIM
    from training.distill import velocity

    g = torch.Generator().manual_seed(emb_seed)
    b = z.shape[0]
    emb = PromptEmbeddings(torch.randn(b, 5, TINY_TEXT_DIM, generator=g), torch.ones(b, 5, dtype=torch.long),
                           torch.nn.functional.normalize(torch.randn(b, TINY_TEXT_DIM, generator=g), dim=-1), [])
    with torch.no_grad():
        return velocity(unet, z, t, emb)


def test_target_equals_two_teacher_ddim_steps_against_diffusers():
    """With 1024 training steps every grid is exact, so diffusers' own DDIMScheduler.step can take
    the teacher's two steps (2N-step schedule) and the student's one step (N-step schedule): a
    student step whose x̂ is the Eq. 8 target lands exactly on the teacher's z_t''."""
    from training.distill import NoiseSchedule, distillation_target, step_grid

    n, unet = 4, tiny_v_unet()
    sched = DDIMScheduler(num_train_timesteps=1024, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                          clip_sample=False, timestep_spacing="trailing")
    grid, schedule = step_grid(sched.config, n), NoiseSchedule(sched)
    x0 = torch.rand(1, 3, 16, 16) * 2 - 1
    for i in range(n):
        t, t_mid, t_next = (g[i : i + 1] for g in (grid.t, grid.t_mid, grid.t_next))
        a, s = schedule.alpha_sigma(t, x0)
        z_t = a * x0 + s * torch.randn_like(x0)

        teacher = DDIMScheduler.from_config(sched.config)
        teacher.set_timesteps(2 * n)
        assert teacher.timesteps[2 * i] == t and teacher.timesteps[2 * i + 1] == t_mid
        z_mid = teacher.step(_teacher_outputs(unet, z_t, t), int(t), z_t).prev_sample
        z_next = teacher.step(_teacher_outputs(unet, z_mid, t_mid), int(t_mid), z_mid).prev_sample
        # Our DDIM step (used in training) agrees with diffusers'.
        ours_mid = schedule.ddim_step(z_t, _teacher_outputs(unet, z_t, t), t, t_mid)
        ours = schedule.ddim_step(ours_mid, _teacher_outputs(unet, ours_mid, t_mid), t_mid, t_next)
        torch.testing.assert_close(ours, z_next, rtol=1e-4, atol=1e-5)

        a_next, s_next = schedule.alpha_sigma(t_next, x0)
        x_target = distillation_target(z_t, z_next, a, s, a_next, s_next)
        student = DDIMScheduler.from_config(sched.config)
        student.set_timesteps(n)
        v_student = (a * z_t - x_target) / s  # the v-prediction whose x̂ is the target
        landed = student.step(v_student, int(t), z_t).prev_sample
        torch.testing.assert_close(landed, z_next, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("clip_teacher", [False, True])
def test_target_reproduces_teacher_on_the_real_schedule(clip_teacher):
    """The real 1000-step cosine schedule (midpoints not equally spaced): one unclipped DDIM step
    from z_t with x̂ = target reproduces the teacher's two steps, clipped or not, at every grid step."""
    from training.distill import NoiseSchedule, distillation_target, step_grid

    n, unet = 8, tiny_v_unet(1)
    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=True)
    grid, schedule = step_grid(sched.config, n), NoiseSchedule(sched)
    x0 = torch.rand(n, 3, 16, 16) * 2 - 1
    t, t_mid, t_next = grid.t, grid.t_mid, grid.t_next  # one sample per grid step
    a, s = schedule.alpha_sigma(t, x0)
    z_t = a * x0 + s * torch.randn_like(x0)
    z_mid = schedule.ddim_step(z_t, _teacher_outputs(unet, z_t, t), t, t_mid, clip=clip_teacher)
    z_next = schedule.ddim_step(z_mid, _teacher_outputs(unet, z_mid, t_mid), t_mid, t_next, clip=clip_teacher)
    a_next, s_next = schedule.alpha_sigma(t_next, x0)
    x_target = distillation_target(z_t, z_next, a, s, a_next, s_next)
    landed = schedule.ddim_step(z_t, (a * z_t - x_target) / s, t, t_next, clip=False)
    torch.testing.assert_close(landed.double(), z_next.double(), rtol=1e-3, atol=1e-4)
    # The last step lands on the clean image: the target is the teacher's final image itself.
    torch.testing.assert_close(x_target[-1], z_next[-1])


def test_truncated_snr_weight_and_guidance():
    from training.distill import guided, truncated_snr_weight

    alpha, sigma = torch.tensor([0.1, 0.6, 0.99]), torch.tensor([0.995, 0.8, 0.141])
    w = truncated_snr_weight(alpha, sigma)
    assert w[0] == 1.0 and w[1] == 1.0 and w[2] == pytest.approx(0.99**2 / 0.141**2, rel=1e-4)
    v_u, v_c = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(guided(v_u, v_c, torch.tensor(1.0)), v_c)  # w = 1: the conditional output
    torch.testing.assert_close(guided(v_u, v_c, torch.tensor(3.0)), v_u + 3.0 * (v_c - v_u))  # the pipeline's CFG


# ----------------------------------------------------------------------------------------------
# The module's losses
# ----------------------------------------------------------------------------------------------
def test_guided_outputs_use_the_same_w_for_teacher_and_student(module, monkeypatch):
    import training.distill as distill

    calls = []
    original = distill.guided_velocity

    def spy(unet, z, t, pair, w):
        calls.append(("teacher" if unet is module.teacher_unet else "student", w.detach().clone().view(-1)))
        return original(unet, z, t, pair, w)

    monkeypatch.setattr(distill, "guided_velocity", spy)
    x0, mask, prompts = fixed_batch(4)
    pair = module.encode(prompts)
    _, w = module.distillation_loss(x0, pair, use_cfg=True, generator=torch.Generator().manual_seed(0))
    assert [who for who, _ in calls] == ["teacher", "teacher", "student"]  # t -> t' -> t'', then one step
    for _, w_call in calls:
        torch.testing.assert_close(w_call, w)
    lo, hi = module.cfg.guidance_range
    assert ((w >= lo) & (w <= hi)).all() and w.unique().numel() == 4  # one w per sample

    calls.clear()
    _, w = module.distillation_loss(x0, pair, use_cfg=False, generator=torch.Generator().manual_seed(0))
    assert calls == [] and (w == 1).all()  # vanilla: plain conditional outputs


def test_loss_mixing_probability_is_respected():
    from training.distill import uses_cfg_loss

    n = 4000
    for p in (0.1, 0.5):
        draws = [uses_cfg_loss(0, step, p) for step in range(n)]
        sd = (p * (1 - p) / n) ** 0.5
        assert abs(np.mean(draws) - p) < 4 * sd, (p, np.mean(draws))
    assert not any(uses_cfg_loss(0, s, 0.0) for s in range(500))
    assert all(uses_cfg_loss(0, s, 1.0) for s in range(500))
    # A pure function of (seed, step): a resumed run makes the same draws; another seed others.
    assert [uses_cfg_loss(3, s, 0.1) for s in range(200)] == [uses_cfg_loss(3, s, 0.1) for s in range(200)]
    assert [uses_cfg_loss(3, s, 0.5) for s in range(200)] != [uses_cfg_loss(4, s, 0.5) for s in range(200)]


def test_ori_loss_is_rescaled_to_the_distillation_loss(module):
    x0, mask, prompts = fixed_batch(4)
    out = module.model_step((x0, mask, prompts), use_cfg=False, generator=torch.Generator().manual_seed(1))
    gamma = module.cfg.gamma
    assert out["loss_ori"] > 0 and out["loss_dstl"] > 0
    # L = L_dstl + γ·L_ori·sg(L_dstl / L_ori): its value is (1 + γ)·L_dstl.
    assert out["loss"].item() == pytest.approx((1 + gamma) * out["loss_dstl"].item(), rel=1e-5)


def test_frozen_parts_stay_frozen_and_out_of_checkpoints(module):
    module.train()
    assert not module.text_encoder.training and not module.teacher_unet.training and module.unet.training
    assert not any(p.requires_grad for p in module.teacher_unet.parameters())
    keys = module.state_dict().keys()
    assert not any(k.startswith(("teacher_unet.", "text_encoder.")) for k in keys)
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("ema_unet.") for k in keys)


def test_a_few_steps_reduce_the_loss(tiny_model_dir, tmp_path):
    from training.distill import DistillationModule

    torch.manual_seed(0)
    module = DistillationModule(distill_config(tiny_model_dir, tmp_path, caption_dropout=0.0))
    batch = fixed_batch(8)
    opt = torch.optim.AdamW(module.unet.parameters(), lr=1e-3)

    def losses():
        with torch.no_grad():
            return [module.model_step(batch, c, torch.Generator().manual_seed(123))["loss_dstl"].item()
                    for c in (False, True)]

    before = losses()
    for step in range(30):  # a fixed batch: the same images, timesteps, noise and w every step
        out = module.model_step(batch, use_cfg=step % 2 == 0, generator=torch.Generator().manual_seed(123))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = losses()
    assert after[0] < 0.8 * before[0] and after[1] < 0.8 * before[1], (before, after)


# ----------------------------------------------------------------------------------------------
# train(cfg): save, load, generate, resume, chain
# ----------------------------------------------------------------------------------------------
def test_post_training_settings_are_not_in_the_checkpoint_key(tiny_model_dir, tmp_path):
    """Changing the guidance sweep, the held-out loss or where the student goes resumes the finished
    checkpoint (the same key); changing what training does starts a new one."""
    from dataclasses import fields, replace

    from training.distill import POST_TRAINING_KEYS, config_hash

    cfg = distill_config(tiny_model_dir, tmp_path)
    assert POST_TRAINING_KEYS <= {f.name for f in fields(cfg)}
    after = replace(cfg, sweep_guidance=not cfg.sweep_guidance, guidance_candidates=[1.25], guidance_eval_prompts=7,
                    heldout_loss_scenes=0, output_dir="elsewhere", metrics_path="elsewhere.json",
                    guidance_eval_steps=3, guidance_checker="models/attributes", share_frozen_components=False)
    assert config_hash(after) == config_hash(cfg)
    for key, value in (("max_steps", 3), ("p_cfg", 0.5), ("guidance_range", (1.0, 2.0)), ("seed", 9)):
        assert config_hash(replace(cfg, **{key: value})) != config_hash(cfg), key


def test_train_saves_a_student_that_loads_generates_and_resumes(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from diffusers import DiffusionPipeline

    from budgetdiff.generation.pipeline import BudgetDiffusionPipeline
    from dataclasses import replace

    from training.distill import DISTILLATION_FILE, config_hash, train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = distill_config(tiny_model_dir, tmp_path)
    metrics = train(cfg)
    assert metrics["steps"] == 2 and metrics["teacher_steps"] == 8 and metrics["student_steps"] == 4
    # the saved default is the teacher's guidance (what the student is judged and served at); the
    # sweep is a diagnostic with its best candidate recorded
    assert metrics["default_guidance"] == DiffusionPipeline.from_pretrained(tiny_model_dir).config.default_guidance_scale
    assert metrics["sweep_best_guidance"] in (1.0, 2.0) and set(metrics["guidance_sweep"]) == {"1.0", "2.0"}
    held = metrics["heldout_loss_dstl"]  # L_dstl of the teacher's UNet as the student, and of the result
    assert set(held) == {"teacher_copy", "student_ema"} and all(set(v) == {"vanilla", "cfg"} for v in held.values())

    pipe = DiffusionPipeline.from_pretrained(cfg.output_dir)
    assert isinstance(pipe, BudgetDiffusionPipeline)
    assert pipe.config.default_guidance_scale == metrics["default_guidance"]
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPTS[:2], num_inference_steps=4, output_type="np")
    assert out.images.shape == (2, 16, 16, 3) and np.isfinite(out.images).all()
    record = json.loads((tmp_path / "student" / DISTILLATION_FILE).read_text())
    assert record["teacher"] == str(tiny_model_dir) and record["student_steps"] == 4
    assert record["teacher_steps"] == 8 and record["training_steps"] == 2
    assert not (tmp_path / "student.tmp").exists()
    # The frozen text encoder is a link to the teacher's, not an 87 MB copy. (A re-saved tokenizer
    # may differ from the teacher's files in metadata: then it stays a real, small folder.)
    assert "text_encoder" in record["linked_to_teacher"]
    assert (tmp_path / "student" / "text_encoder").is_symlink()
    assert (tmp_path / "student" / "text_encoder").resolve() == (tiny_model_dir / "text_encoder").resolve()
    # `budgetdiff generate --model STUDENT --steps 4` runs it unchanged.
    from budgetdiff.cli import main

    assert main(["generate", PROMPTS[0], "--model", cfg.output_dir, "--steps", "4",
                 "--out", str(tmp_path / "x.png")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["steps"] == 4 and line["nfe"] == 4 and (tmp_path / "x.png").is_file()

    # The student is a teacher in turn (16 -> 8 in the real workflow); the chain is recorded.
    # A checkpoint of a longer run with the same config resumes (as training/base.py).
    chained = distill_config(tmp_path / "student", tmp_path / "chain", student_steps=2, max_steps=3,
                             sweep_guidance=False)
    ckpt = tmp_path / "chain" / "ckpt" / config_hash(chained)
    first = replace(chained, max_steps=2)
    train(first)
    ckpt.mkdir(parents=True)
    (tmp_path / "chain" / "ckpt" / config_hash(first) / "last.ckpt").rename(ckpt / "last.ckpt")
    resumed = train(chained)
    assert resumed["steps"] == 3 and resumed["seconds_per_step"] is not None
    record = json.loads((tmp_path / "chain" / "student" / DISTILLATION_FILE).read_text())
    assert record["teacher_distillation"]["student_steps"] == 4 and record["student_steps"] == 2
    # A student of a student links to the real folder, not to a link.
    assert (tmp_path / "chain" / "student" / "text_encoder").resolve() == (tiny_model_dir / "text_encoder").resolve()
    assert not os.readlink(tmp_path / "chain" / "student" / "text_encoder").endswith("student/text_encoder")

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["budgetdiff"])
    assert set(runs["tags.dvc_stage"]) == {"distill_test"} and runs["tags.git_commit"].notna().all()


def test_stage_config_merges_the_sections(monkeypatch, tmp_path):
    """Synthetic params: the variant overrides the stage section, which overrides ``distill``."""
    import mlops.params
    from mlops.params import ParamsError
    from training.distill import stage_config

    params = {
        "distill": {**yaml_section("distill"), "teacher": "models/t", "guidance_range": [1, 3], "p_cfg": 0.5, "seed": 0,
                    "checkpoint_dir": "ck", "output_dir": "shared", "metrics_path": "m.json"},
        "distill_16": {"student_steps": 16, "max_steps": 5, "output_dir": "s16"},
        "distill_8": {"student_steps": 8, "max_steps": 5, "guidance_range": [1, 2]},
        "distill_8_variants": {"cfg": {"p_cfg": 0.1, "output_dir": "s8"},
                               "vanilla": {"p_cfg": 0.0, "output_dir": "s8v", "guidance_range": [1, 1.5]}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(mlops.params, "PARAMS_FILE", tmp_path / "params.yaml")
    c16 = stage_config("distill_16")
    assert (c16.teacher, c16.student_steps, c16.output_dir, c16.guidance_range) == ("models/t", 16, "s16", (1.0, 3.0))
    assert c16.stage == "distill_16" and c16.checkpoint_dir == str(Path("ck") / "distill_16")
    cfg, van = stage_config("distill_8", "cfg"), stage_config("distill_8", "vanilla")
    assert (cfg.p_cfg, cfg.guidance_range, cfg.student_steps, cfg.output_dir) == (0.1, (1.0, 2.0), 8, "s8")
    assert (van.p_cfg, van.guidance_range, van.output_dir) == (0.0, (1.0, 1.5), "s8v")
    assert van.stage == "distill_8@vanilla" and van.checkpoint_dir == str(Path("ck") / "distill_8_vanilla")
    with pytest.raises(ValueError, match="unknown variant"):
        stage_config("distill_8", "nope")
    # A key no run reads is refused, naming the variant's sections.
    params["distill_8_variants"]["cfg"]["p_cgf"] = 0.2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"'distill_8_variants.cfg': unknown key p_cgf"):
        stage_config("distill_8", "cfg")


def test_distill_params_keep_their_couplings(monkeypatch):
    """Invariants of the shipped params (not their values, which retuning changes): the 8-step
    variants share teacher, steps and guidance range (their held-out CFG losses compare like for
    like); a training-seed replicate differs from its variant only in seed and paths; every run
    has its own output and checkpoint directory; dvc.yaml's foreach and bench_distill follow."""
    import mlops.params
    from mlops.params import config_dict
    from training.distill import stage_config

    monkeypatch.setattr(mlops.params, "PARAMS_FILE", REPO / "params.yaml")
    variants = yaml_section("distill_8_variants")
    configs = {v: stage_config("distill_8", v) for v in variants}
    main = {v: c for v, c in configs.items() if "_seed" not in v}
    assert len({(c.teacher, c.student_steps, c.guidance_range) for c in main.values()}) == 1
    paths = ("seed", "output_dir", "metrics_path", "checkpoint_dir", "stage")
    plain = {v: config_dict(c) for v, c in configs.items()}
    for v, c in plain.items():
        if "_seed" in v:
            base = plain[v.split("_seed")[0]]
            assert c["seed"] != base["seed"]
            assert {k: c[k] for k in c if k not in paths} == {k: base[k] for k in base if k not in paths}
    for key in ("output_dir", "checkpoint_dir", "metrics_path"):
        assert len({c[key] for c in plain.values()}) == len(configs), key
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["distill_8"]["foreach"] == "${distill_8_variants}"  # one list: the variants section
    # bench_distill reads the students from the same list, and dvc.yaml gives it each one's directory.
    from benchmarks.bench_distill import distilled_runs

    runs, training_seeds = distilled_runs(yaml_section("distill"), yaml_section("distill_16"),
                                          yaml_section("distill_8"), variants)
    assert not set(runs) & set(yaml_section("bench_distill")["runs"])
    assert {r for reps_ in training_seeds.values() for r in reps_} == {f"student_8_{v}" for v in variants if "_seed" in v}
    assert {s.model for s in runs.values()} <= set(stages["bench_distill"]["deps"])


def test_distilled_runs_derive_students_and_replicates():
    """Synthetic params: a replicate is the variant with another seed and otherwise equal settings;
    an ambiguous or unmatched replicate is named."""
    from benchmarks.bench_distill import RunSpec, distilled_runs

    variants = {"a": {"p_cfg": 0.0, "output_dir": "A"}, "b": {"p_cfg": 0.1, "output_dir": "B"},
                "b_s1": {"seed": 1, "p_cfg": 0.1, "output_dir": "B1", "metrics_path": "b1.json"},
                "a_s1": {"seed": 1, "p_cfg": 0.0, "output_dir": "A1"}, "fast": {"student_steps": 4, "output_dir": "F"}}
    runs, seeds = distilled_runs({"seed": 0}, {"output_dir": "S16", "student_steps": 16}, {"student_steps": 8}, variants)
    assert list(runs) == ["student_16", "student_8_a", "student_8_b", "student_8_b_s1", "student_8_a_s1", "student_8_fast"]
    assert runs["student_8_fast"] == RunSpec("F", 4) and runs["student_16"] == RunSpec("S16", 16)
    assert seeds == {"student_8_b": ["student_8_b_s1"], "student_8_a": ["student_8_a_s1"]}
    with pytest.raises(ValueError, match=r"distill_8_variants.odd: a seed-1 replicate .* found 0"):
        distilled_runs({"seed": 0}, {"output_dir": "S16", "student_steps": 16}, {"student_steps": 8},
                       {**variants, "odd": {"seed": 1, "p_cfg": 0.5, "output_dir": "O"}})


# ----------------------------------------------------------------------------------------------
# bench_distill on tiny models and evaluators
# ----------------------------------------------------------------------------------------------
def test_paired_difference():
    from benchmarks.bench_distill import paired_difference

    d = paired_difference([1.0, 0.5, float("nan"), 1.0], [0.5, 0.5, 1.0, 0.0])
    assert d["prompts"] == 3 and d["mean"] == pytest.approx(0.5)
    assert d["ci95"][0] < 0.5 < d["ci95"][1]
    assert paired_difference(None, [1.0]) is None and paired_difference([1.0], [0.0]) is None


def _clipt_results(values: dict[str, float], guidance="1.25"):
    return {run: {guidance: {"fd": 0.05, "clipt": v, "attr_acc": 0.7}} for run, v in values.items()}


def test_clipt_target_is_judged_on_the_mean_over_training_seeds():
    from benchmarks.bench_distill import DistillTargets, check_targets, training_seed_spread

    targets = DistillTargets(fd_max_ratio_to_teacher_50=1.1)
    seeds_of = {"student_8_cfg": ["c1", "c2"], "student_8_vanilla": ["v1", "v2"]}
    # Seed 0 alone loses by 0.002; seeds 1 and 2 win by 0.004 and 0.001: the mean wins by 0.001.
    results = _clipt_results({"student_8_cfg": 0.848, "student_8_vanilla": 0.850, "c1": 0.854, "v1": 0.850,
                              "c2": 0.851, "v2": 0.850, "teacher_50": 0.85, "teacher_8": 0.85})
    n = 50
    rng = np.random.default_rng(0)
    per_prompt = {run: {"1.25": {"clipt": (r["1.25"]["clipt"] + 0.01 * rng.standard_normal(n)).tolist()}}
                  for run, r in results.items()}
    t = check_targets(results, "1.25", targets, seeds_of, per_prompt)["clipt_student_8_cfg_ge_student_8_vanilla"]
    assert t["measured"] == pytest.approx((0.848 + 0.854 + 0.851) / 3)
    assert t["limit"] == pytest.approx(0.850) and t["met"] is True
    seeds = t["training_seeds"]
    assert seeds["pairs"] == [["student_8_cfg", "student_8_vanilla"], ["c1", "v1"], ["c2", "v2"]]
    assert seeds["difference_by_seed"] == pytest.approx([-0.002, 0.004, 0.001])
    assert seeds["difference_sd_across_seeds"] == pytest.approx(np.std([-0.002, 0.004, 0.001], ddof=1), abs=1e-5)
    assert seeds["seed_0_alone"]["met"] is False and seeds["seed_0_alone"]["measured"] == 0.848
    # The paired difference averages each prompt's difference over the three seeds.
    d = np.mean([np.subtract(per_prompt[c]["1.25"]["clipt"], per_prompt[v]["1.25"]["clipt"])
                 for c, v in seeds["pairs"]], axis=0)
    assert t["paired_difference"]["prompts"] == n and t["paired_difference"]["mean"] == pytest.approx(d.mean(), abs=1e-5)
    # The other way round: seed 0 wins alone, the mean loses.
    lose = {**results, **_clipt_results({"student_8_cfg": 0.851, "c1": 0.846, "c2": 0.849})}
    t = check_targets(lose, "1.25", targets, seeds_of)["clipt_student_8_cfg_ge_student_8_vanilla"]
    assert t["met"] is False and t["training_seeds"]["seed_0_alone"]["met"] is True
    assert t["paired_difference"] is None  # no per-prompt values given
    # A seed whose pair is not scored at this guidance drops out; without replicates, the one pair.
    partial = {k: v for k, v in results.items() if k != "v2"}
    t = check_targets(partial, "1.25", targets, seeds_of)["clipt_student_8_cfg_ge_student_8_vanilla"]
    assert len(t["training_seeds"]["pairs"]) == 2 and t["measured"] == pytest.approx((0.848 + 0.854) / 2)
    alone = check_targets(results, "1.25", targets)["clipt_student_8_cfg_ge_student_8_vanilla"]
    assert (alone["measured"], alone["limit"], alone["met"]) == (0.848, 0.850, False)
    with pytest.raises(ValueError, match="pair by position"):
        check_targets(results, "1.25", targets, {"student_8_cfg": ["c1"], "student_8_vanilla": []})
    spread = training_seed_spread(results, seeds_of)
    assert spread["student_8_cfg"]["runs"] == ["student_8_cfg", "c1", "c2"]
    s = spread["student_8_cfg"]["by_guidance"]["1.25"]["clipt"]
    assert s["mean"] == pytest.approx(0.851) and s["sd"] == pytest.approx(0.003) and len(s["values"]) == 3


def test_bench_distill_reports_every_run_and_the_targets(tiny_model_dir, tmp_path, monkeypatch):
    import dataclasses

    import benchmarks.bench_distill as bench
    from mlops.params import config_from_dict
    from test_metrics_helpers import tiny_backbone, tiny_checker

    monkeypatch.setattr(bench, "load_clip_backbone", lambda _dir: tiny_backbone())
    monkeypatch.setattr(bench, "load_attribute_checker", lambda _dir: tiny_checker())
    model = str(tiny_model_dir)
    cfg = config_from_dict(bench.BenchDistillConfig, {
        **yaml_section("bench_distill"), "prompts": 4, "batch_size": 4, "grid_prompts": 2,
        "guidance_scales": [1.0, 3.0], "guidance": 2.0,
        "runs": {"teacher_50": {"model": model, "steps": 4}, "teacher_8": {"model": model, "steps": 2},
                 "student_8_cfg": {"model": model, "steps": 2}},
        "csv_path": str(tmp_path / "t.csv"), "plot_path": str(tmp_path / "t.png"),
        "grid_path": str(tmp_path / "g.png"), "cache_dir": str(tmp_path / "cache")})
    report = bench.run(cfg, {})
    assert report["guidance_scales"] == [1.0, 2.0, 3.0]  # the target guidance joins the sweep
    r = report["results"]["student_8_cfg"]["2.0"]
    assert r["nfe"] == 2 and r["fd"] >= 0 and 0 <= r["attr_acc"] <= 1 and r["seconds_per_image"] > 0
    assert report["results"]["teacher_50"]["2.0"]["gflops_per_image"] == pytest.approx(2 * r["gflops_per_image"])
    targets = report["targets"]
    assert targets["attr_acc_student_8_cfg_ge_teacher_8"]["met"] is True  # the same model and steps
    assert targets["clipt_student_8_cfg_ge_student_8_vanilla"]["met"] is None  # no vanilla run here
    paired = targets["attr_acc_student_8_cfg_ge_teacher_8"]["paired_difference"]  # same images: no difference
    assert paired["prompts"] == 4 and paired["mean"] == 0 and paired["ci95"] == [0, 0]
    assert targets["clipt_student_8_cfg_ge_student_8_vanilla"]["paired_difference"] is None
    by_g = report["targets_by_guidance"]  # the same targets at every scale of the sweep
    assert set(by_g) == {"1.0", "2.0", "3.0"}
    assert by_g["2.0"]["attr_acc_student_8_cfg_ge_teacher_8"]["met"] is targets["attr_acc_student_8_cfg_ge_teacher_8"]["met"]
    assert all(by_g[g]["attr_acc_student_8_cfg_ge_teacher_8"]["met"] is True for g in by_g)
    assert (tmp_path / "t.png").stat().st_size > 0 and (tmp_path / "g.png").stat().st_size > 0
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 1 + 3 * 3

    # An interrupted run resumes: every (run, guidance) result is kept, keyed by the model's weights.
    assert len(list((tmp_path / "cache").glob("*.json"))) == 3 * 3
    again = bench.run(cfg, {})
    assert again["results"] == report["results"] and again["targets"] == report["targets"]
    # A model that is not there yet is named, before any work is lost.
    missing = dataclasses.replace(cfg, runs={"teacher_50": bench.RunSpec(model, 4),
                                             "student_8_cfg": bench.RunSpec(str(tmp_path / "nope"), 2)})
    with pytest.raises(ValueError, match="nope not found"):
        bench.run(missing)

    # Training-seed replicates: scored like any run (and cached), paired by seed in the CLIP-T
    # target, kept out of the sample grid; a replicate that is not a run is named.
    seeds = dataclasses.replace(cfg, guidance_scales=[], runs={**cfg.runs, **{
        name: bench.RunSpec(model, 2) for name in ("student_8_vanilla", "c1", "v1")}})
    report = bench.run(seeds, {"student_8_cfg": ["c1"], "student_8_vanilla": ["v1"]})
    clipt = report["targets"]["clipt_student_8_cfg_ge_student_8_vanilla"]
    assert clipt["met"] is True and clipt["training_seeds"]["difference_by_seed"] == [0, 0]  # the same model
    assert clipt["paired_difference"]["prompts"] == 4 and clipt["paired_difference"]["mean"] == 0
    assert report["training_seeds"]["student_8_cfg"]["runs"] == ["student_8_cfg", "c1"]
    assert report["training_seeds"]["student_8_cfg"]["by_guidance"]["2.0"]["clipt"]["sd"] == 0
    assert "training_seeds" in report["targets_by_guidance"]["2.0"]["clipt_student_8_cfg_ge_student_8_vanilla"]
    from PIL import Image

    with Image.open(tmp_path / "g.png") as grid:  # ground truth and the four runs, not the replicates
        assert grid.width == 260 + 112 * 5
    with pytest.raises(ValueError, match="not in runs: v9"):
        bench.run(seeds, {"student_8_cfg": ["c1"], "student_8_vanilla": ["v9"]})
    # Both list errors come before any model is loaded or image generated.
    monkeypatch.setattr(bench, "load_clip_backbone", lambda _dir: pytest.fail("loaded before the check"))
    with pytest.raises(ValueError, match="pair by position"):
        bench.run(seeds, {"student_8_cfg": ["c1"], "student_8_vanilla": []})
    with pytest.raises(ValueError, match="not in runs: v9"):
        bench.run(seeds, {"student_8_cfg": ["c1"], "student_8_vanilla": ["v9"]})
