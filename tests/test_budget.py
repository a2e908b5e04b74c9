"""BudgetFusion: the curve predictor, its normalisation, the step-choice rules, training, the
compatibility checks and ``budgetdiff generate --steps auto`` (tiny random components)."""

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from budgetdiff.methods.budget import (
    BudgetModelError,
    BudgetModelMismatch,
    BudgetPredictor,
    MetricCurves,
    PlateauRule,
    QualityTargetRule,
    TargetNormalizer,
    build_network,
    choose_steps,
    load_budget_predictor,
    make_config,
    model_record,
    quality_fraction,
    save_budget_model,
)
from budgetdiff.cli import main
from budgetdiff.domain.scenes import sample_scene, spec_to_prompt

METRICS = ["pixel/lsnr", "pixel/psnr", "pixel/ssim", "mid/lpips_alex_randinit", "high/clipt_domainclip",
           "high/iclip_domainclip", "domain/attr_acc"]
NO_REFERENCE = ["pixel/lsnr", "high/clipt_domainclip", "domain/attr_acc"]
GRID = [2, 3, 4, 6, 8, 12, 20]
REFERENCE = 30
LEVELS = {"pixel": "pixel/ssim", "mid": "mid/lpips_alex_randinit", "high": "high/iclip_domainclip"}
PROMPT = "a small red circle at the top left on a white background"


def synthetic_dataset(n_prompts: int = 48, grid=GRID, reference: int = REFERENCE, seed: int = 0) -> pd.DataFrame:
    """The dataset stage's schema with made-up curves: quality rises as 1 - exp(-s / τ) with τ
    growing with the scene's object count, so a prompt's curve depends on its text."""
    rng = np.random.default_rng(seed)
    rows = []
    for pid in range(n_prompts):
        k = 1 + pid % 4
        seed_ = 70_000_000 + pid
        prompt = spec_to_prompt(sample_scene(seed_, n_objects=k))
        split = {6: "val", 7: "test"}.get(pid % 8, "train")
        tau = 1.0 + 1.5 * k
        for s in [*grid, reference]:
            ref = s == reference
            q = 1 - math.exp(-s / tau) + rng.normal(0, 0.01)
            row = {"prompt_id": pid, "prompt": prompt, "seed": seed_, "split": split, "complexity": k, "steps": s,
                   "is_reference": ref, "nfe": s, "seconds": 0.01 * s, "knee_steps": grid[-1],
                   "pixel/lsnr": 12 + 3 * q, "pixel/psnr": np.nan if ref else 10 + 25 * q,
                   "pixel/ssim": np.nan if ref else 0.3 + 0.7 * q,
                   "mid/lpips_alex_randinit": np.nan if ref else 0.1 * (1 - q),
                   "high/clipt_domainclip": 0.3 + 0.05 * q,
                   "high/iclip_domainclip": np.nan if ref else 0.9 + 0.1 * q, "domain/attr_acc": min(1.0, 0.5 + 0.5 * q)}
            rows.append(row)
    table = pd.DataFrame(rows)
    return table.astype({"prompt": "string", "split": "string", "is_reference": "bool"})


def tiny_budget_config(model_dir, arch="bilstm", grid=GRID, max_text_length=64, text_dim=32, **kw) -> dict:
    values = np.random.default_rng(0).normal(size=(8, len(METRICS), len(grid) + 1))
    network = {"hidden": 8} if arch == "bilstm" else {"hidden": 16}
    return make_config(arch, network, text_dim=text_dim, max_text_length=max_text_length, step_grid=grid,
                       reference_steps=REFERENCE, metrics=METRICS, rule_metrics={"pixel": "pixel/ssim",
                       "mid": "mid/lpips", "high": "high/iclip"}, normalizer=TargetNormalizer.fit(METRICS, values),
                       model=model_record(model_dir), **kw)


@pytest.fixture(scope="module")
def tiny_budget_dir(tiny_model_dir, tmp_path_factory):
    """A randomly initialised budget model for the tiny pipeline (its 32-wide tiny encoder)."""
    path = tmp_path_factory.mktemp("budget") / "budget"
    config = tiny_budget_config(tiny_model_dir)
    torch.manual_seed(0)
    save_budget_model(build_network(config), config, path)
    return path


# ------------------------------------------------------------------------------------------------
# Networks and normalisation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bilstm", "mlp"])
def test_predictor_shapes_and_batch_independence(arch, tiny_components, tiny_model_dir):
    _, encoder, tokenizer = tiny_components
    config = tiny_budget_config(tiny_model_dir, arch)
    predictor = BudgetPredictor(build_network(config), config)
    prompts = [PROMPT, "two large blue squares at the left and in the top right on a black background with dots"]
    emb = predictor.encode(prompts, encoder, tokenizer)
    z = predictor.predict_normalized(emb)
    assert z.shape == (2, len(METRICS), len(GRID) + 1)
    alone = predictor.predict_normalized(predictor.encode(prompts[:1], encoder, tokenizer))
    torch.testing.assert_close(alone[0], z[0], atol=1e-5, rtol=1e-5)  # padding does not leak in
    curves = predictor.curves_from_normalized(z)
    assert len(curves) == 2 and curves[0].step_grid == GRID
    assert set(curves[0].values) == set(METRICS) and all(v.shape == (len(GRID),) for v in curves[0].values.values())
    assert set(curves[0].reference) == set(NO_REFERENCE)
    record = curves[0].to_record()
    assert record["steps"] == GRID and len(record["metrics"]["pixel/ssim"]) == len(GRID)


def test_normalisation_round_trip_and_sign():
    rng = np.random.default_rng(1)
    values = rng.normal(loc=[[5.0], [-2.0]], scale=3.0, size=(50, 2, 6))
    values[0, 0, 0] = np.nan
    norm = TargetNormalizer.fit(["pixel/psnr", "mid/lpips_alex"], values)
    z = norm.normalize(values)
    np.testing.assert_allclose(norm.denormalize(z), values, equal_nan=True)
    assert abs(np.nanmean(z[:, 0])) < 1e-9 and abs(np.nanstd(z[:, 0]) - 1) < 1e-9
    assert norm.sign.tolist() == [1.0, -1.0]  # LPIPS is a distance: a lower value gives a higher z
    assert np.corrcoef(values[:, 1].ravel(), z[:, 1].ravel())[0, 1] == pytest.approx(-1.0)
    again = TargetNormalizer.from_dict(norm.metrics, json.loads(json.dumps(norm.to_dict())))
    zt = again.normalize(torch.as_tensor(np.nan_to_num(values)))
    np.testing.assert_allclose(again.denormalize(zt).numpy(), np.nan_to_num(values))


# ------------------------------------------------------------------------------------------------
# choose_steps on hand-made curves
# ------------------------------------------------------------------------------------------------
def curves_of(ssim, lpips=None, iclip=None, grid=(2, 4, 8, 16, 32), scale=None, **extra) -> MetricCurves:
    n = len(grid)
    values = {"pixel/ssim": ssim, "mid/lpips_alex": lpips if lpips is not None else [0.0] * n,
              "high/iclip_x": iclip if iclip is not None else [1.0] * n, **extra}
    levels = {"pixel": "pixel/ssim", "mid": "mid/lpips_alex", "high": "high/iclip_x"}
    return MetricCurves(list(grid), values, levels, scale=scale or {})


def test_plateau_rule():
    # ssim gains per step: 2->4: 0.15, 4->8: 0.05, 8->16: 0.01, 16->32: 0.001
    c = curves_of([0.3, 0.6, 0.8, 0.88, 0.896])
    assert choose_steps(c, PlateauRule(0.02)).steps == 8
    assert choose_steps(c, PlateauRule(0.1)).steps == 4
    assert choose_steps(c, PlateauRule(0.005)).steps == 16
    # ε applies to normalised units: the same curve over a std of 0.5 gains twice as much per step
    assert choose_steps(curves_of([0.3, 0.6, 0.8, 0.88, 0.896], scale={"pixel/ssim": 0.5}), PlateauRule(0.015)).steps == 16
    # LPIPS falls (a distance): its gain is the fall; it binds here
    c = curves_of([0.9] * 5, lpips=[0.5, 0.2, 0.05, 0.045, 0.044])
    choice = choose_steps(c, PlateauRule(0.01))
    assert choice.steps == 8 and choice.per_level == {"pixel": 2, "mid": 8, "high": 2} and choice.reached
    # a dip later on resets the plateau: the gain must stay below ε from the chosen count on
    assert choose_steps(curves_of([0.3, 0.31, 0.2, 0.5, 0.5]), PlateauRule(0.01)).steps == 16


def test_plateau_still_climbing_is_flagged():
    choice = choose_steps(curves_of([0.1, 0.2, 0.4, 0.6, 0.9]), PlateauRule(0.01))
    assert choice.steps == 32 and not choice.reached and "pixel" in choice.note
    assert choice.to_record()["rule"] == {"name": "plateau", "epsilon": 0.01}


def test_quality_target_rule():
    c = curves_of([0.5, 0.85, 0.92, 0.97, 0.99], lpips=[0.3, 0.1, 0.05, 0.02, 0.01], iclip=[0.8, 0.9, 0.95, 0.99, 1.0])
    assert choose_steps(c, QualityTargetRule(0.9)).steps == 8
    assert choose_steps(c, QualityTargetRule(0.95)).steps == 16
    assert choose_steps(c, QualityTargetRule(0.5)).steps == 2
    # 1 - LPIPS binds: 0.7 at 2 steps
    assert choose_steps(c, QualityTargetRule(0.75)).per_level["mid"] == 4
    # reached, lost, reached again: the count from which it stays reached
    assert choose_steps(curves_of([0.95, 0.8, 0.92, 0.95, 0.96]), QualityTargetRule(0.9)).steps == 8


def test_quality_target_never_reached_takes_the_largest_step_with_a_flag():
    choice = choose_steps(curves_of([0.5, 0.6, 0.7, 0.8, 0.85]), QualityTargetRule(0.9))
    assert choice.steps == 32 and choice.reached is False and choice.per_level["pixel"] is None
    assert "pixel" in choice.note and "0.9" in choice.note


def test_quality_fraction_definitions():
    assert quality_fraction("pixel/ssim", [0.9]).tolist() == [0.9]
    assert quality_fraction("mid/lpips_alex", [0.1]).tolist() == pytest.approx([0.9])
    assert quality_fraction("pixel/psnr", [20.0, 60.0], psnr_cap_db=40).tolist() == [0.5, 1.0]
    assert quality_fraction("pixel/lsnr", [15.0], reference=20.0).tolist() == [0.75]
    assert quality_fraction("domain/attr_acc", [0.0], reference=0.0).tolist() == [1.0]
    with pytest.raises(ValueError, match="reference"):
        quality_fraction("high/clipt_x", [0.3])
    with pytest.raises(ValueError, match="quality-target"):
        QualityTargetRule(1.5)
    with pytest.raises(ValueError, match="epsilon"):
        PlateauRule(-1)


# ------------------------------------------------------------------------------------------------
# Saving, loading, compatibility
# ------------------------------------------------------------------------------------------------
def test_save_load_and_mismatch_errors_name_both(tiny_budget_dir, tiny_model_dir, tmp_path):
    predictor = load_budget_predictor(tiny_budget_dir)
    assert predictor.step_grid == GRID and predictor.config["model"]["path"] == str(tiny_model_dir)
    predictor.check_model(tiny_model_dir)
    predictor.check_step_grid(GRID)
    with pytest.raises(BudgetModelMismatch) as err:
        predictor.check_step_grid([2, 4, 8], "data/dataset.parquet")
    assert str(GRID) in str(err.value) and "[2, 4, 8]" in str(err.value) and "data/dataset.parquet" in str(err.value)

    other = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other)
    weights = next((other / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    with pytest.raises(BudgetModelMismatch) as err:
        predictor.check_model(other)
    message = str(err.value)
    assert str(tiny_model_dir) in message and str(other) in message
    assert predictor.config["model"]["unet_sha256"] in message

    with pytest.raises(BudgetModelError, match="does not exist"):
        load_budget_predictor(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BudgetModelError, match="lacks"):
        load_budget_predictor(tmp_path / "empty")


def test_long_prompt_is_truncated_with_a_note(tiny_components, tiny_model_dir):
    _, encoder, tokenizer = tiny_components
    config = tiny_budget_config(tiny_model_dir, max_text_length=8)
    predictor = BudgetPredictor(build_network(config), config)
    long_prompt = " and ".join([PROMPT] * 4)
    short, long = predictor.predict(["a red circle", long_prompt], encoder, tokenizer)
    assert not short.prompt_truncated and long.prompt_truncated
    assert all(np.isfinite(v).all() for v in long.values.values())


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def train_cfg(tmp_path, model_dir, dataset_path, **kw) -> dict:
    cfg = {"dataset": str(dataset_path), "model": str(model_dir), "seed": 0, "metrics": None,
           "rule_metrics": {"pixel": "pixel/ssim", "mid": "mid/lpips", "high": "high/iclip"},
           "plateau_epsilon": 0.01, "psnr_cap_db": 40.0,
           "calibrate_epsilon": {"candidates": [0.001, 0.01, 0.1], "full_steps": 20, "max_drop_pct": 2.0}, "bilstm": {"hidden": 8, "layers": 1, "dropout": 0.0},
           "mlp": {"hidden": 16, "dropout": 0.0}, "batch_size": 16, "lr": 3e-3, "weight_decay": 0.0,
           "max_epochs": 6, "patience": 20, "val_split": "val",
           "output_dir": str(tmp_path / "budget"), "metrics_path": str(tmp_path / "train_budget.json")}
    return {**cfg, **kw}


def train_config(tmp_path, model_dir, dataset_path, **kw):
    """``train_cfg`` as the typed ``train_budget`` config ``train`` takes."""
    from mlops.params import config_from_dict
    from training.budget import TrainBudgetConfig

    return config_from_dict(TrainBudgetConfig, train_cfg(tmp_path, model_dir, dataset_path, **kw))


def test_dataset_curves_pivot():
    from training.budget import dataset_curves

    table = synthetic_dataset(8)
    curves = dataset_curves(table)
    assert curves.step_grid == GRID and curves.reference_steps == REFERENCE and curves.metrics == METRICS
    assert curves.values.shape == (8, len(METRICS), len(GRID) + 1)
    ref_col = curves.values[:, :, -1]
    no_ref = [METRICS.index(m) for m in NO_REFERENCE]
    assert np.isfinite(ref_col[:, no_ref]).all() and np.isnan(np.delete(ref_col, no_ref, axis=1)).all()
    assert np.isfinite(curves.values[:, :, :-1]).all()
    row = table[(table.prompt_id == 3) & (table.steps == 4)]
    assert curves.values[3, METRICS.index("pixel/ssim"), GRID.index(4)] == pytest.approx(row["pixel/ssim"].item())


def test_a_few_training_steps_reduce_the_loss(tiny_components):
    from training.budget import BudgetModule, dataset_curves, embed_prompts, masked_mse, tensors

    _, encoder, tokenizer = tiny_components
    curves = dataset_curves(synthetic_dataset(32))
    rows = curves.subset("train")
    norm = TargetNormalizer.fit(curves.metrics, curves.values[rows])
    emb = embed_prompts(curves.prompts, encoder, tokenizer, 64)
    batch = tensors(emb, norm.normalize(curves.values), rows).tensors
    config = make_config("bilstm", {"hidden": 16, "dropout": 0.0}, text_dim=32, max_text_length=64, step_grid=GRID,
                         reference_steps=REFERENCE, metrics=METRICS, rule_metrics=LEVELS, normalizer=norm,
                         model={"path": "x", "unet_sha256": "0"})
    torch.manual_seed(0)
    module = BudgetModule(config, lr=1e-2, weight_decay=0.0)
    opt = module.configure_optimizers()["optimizer"]
    with torch.no_grad():
        before = float(module.model_step(batch))
    for _ in range(40):
        opt.zero_grad()
        loss = module.model_step(batch)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(module.model_step(batch))
    assert after < 0.5 * before, (before, after)
    assert float(masked_mse(torch.zeros(2), torch.ones(2), torch.tensor([1.0, 0.0]))) == 1.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """train_budget on a synthetic dataset, logged to a scratch MLflow database (once per module)."""
    from training.budget import train

    tmp_path = tmp_path_factory.mktemp("train_budget")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tmp_path / "dataset.parquet"
    synthetic_dataset(24).to_parquet(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        metrics = train(train_config(tmp_path, tiny_model_dir, path), progress=False)
    return tmp_path, uri, metrics


def test_train_saves_both_networks_and_logs_to_mlflow(trained, tiny_model_dir):
    tmp_path, uri, metrics = trained
    assert metrics["prompts"] == {"train": 18, "val": 3, "all": 24}
    for arch in ("bilstm", "mlp"):
        assert 1 <= metrics[arch]["epochs"] <= 6 and set(metrics[arch]["val_mae"]) == set(METRICS)
    predictor = load_budget_predictor(tmp_path / "budget")
    ablation = load_budget_predictor(tmp_path / "budget" / "mlp")
    assert predictor.config["architecture"] == "bilstm" and ablation.config["architecture"] == "mlp"
    assert predictor.config["model"]["path"] == str(tiny_model_dir) and predictor.step_grid == GRID
    assert predictor.config["normalization"]["sign"]["mid/lpips_alex_randinit"] == -1.0
    predictor.check_model(tiny_model_dir)
    calibration = metrics["bilstm"]["epsilon_calibration_on_val"]
    assert [row["epsilon"] for row in calibration] == [0.001, 0.01, 0.1]
    within = [row["epsilon"] for row in calibration if row["within"]]
    assert predictor.config["rules"]["plateau_epsilon"] == metrics["bilstm"]["plateau_epsilon"] == \
        (max(within) if within else 0.001)

    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["budgetdiff"])
    assert set(runs["tags.mlflow.runName"]) == {"train_budget", "train_budget_mlp"}
    assert (runs["tags.dvc_stage"] == "train_budget").all()
    run_id = runs.loc[runs["tags.mlflow.runName"] == "train_budget", "run_id"].item()
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "val/loss")
    assert len(history) == metrics["bilstm"]["epochs"]  # one val/loss per epoch: the learning curve
    artifacts = [a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run_id, "budget_model")]
    assert "budget_model/model.safetensors" in artifacts and "budget_model/config.json" in artifacts


def test_train_names_an_empty_split(tmp_path, tiny_model_dir):
    from training.budget import train

    path = tmp_path / "dataset.parquet"
    synthetic_dataset(8).to_parquet(path)
    with pytest.raises(ValueError, match="val_split.*'holdout'"):
        train(train_config(tmp_path, tiny_model_dir, path, val_split="holdout"), progress=False)


# ------------------------------------------------------------------------------------------------
# budgetdiff generate --steps auto
# ------------------------------------------------------------------------------------------------
def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_steps_auto(tiny_model_dir, tiny_budget_dir, tmp_path, capsys):
    base = ["generate", PROMPT, "--model", str(tiny_model_dir), "--budget-model", str(tiny_budget_dir),
            "--steps", "auto", "--out", str(tmp_path / "x.png")]
    code, out, err = run_cli(base, capsys)
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    budget = record["budget"]
    assert record["steps_auto"] is True and record["steps"] == budget["chosen_steps"] in GRID
    assert record["nfe"] == record["steps"]
    assert budget["rule"]["name"] == "plateau" and budget["prediction_ms"] > 0
    assert budget["predicted_curves"]["steps"] == GRID and set(budget["predicted_curves"]["metrics"]) == set(METRICS)
    assert set(budget["per_level"]) == {"pixel", "mid", "high"} and budget["prompt_truncated"] is False

    code, out, err = run_cli(base + ["--quality-target", "0.5"], capsys)
    assert code == 0, err
    budget = json.loads(out.strip().splitlines()[-1])["budget"]
    assert budget["rule"] == {"name": "quality_target", "q": 0.5, "psnr_cap_db": 40.0}


@pytest.mark.parametrize("extra, names", [
    (["--steps", "auto", "--budget-model", "/no/such/budget"], "--budget-model"),
    (["--steps", "20", "--quality-target", "0.9"], "--quality-target"),
    (["--steps", "auto", "--quality-target", "1.5"], "--quality-target"),
    (["--steps", "auto", "--quality-target", "nan"], "--quality-target"),
    (["--steps", "sometimes"], "--steps"),
])
def test_generate_auto_bad_arguments(extra, names, tiny_model_dir, tiny_budget_dir, tmp_path, capsys):
    code, _, err = run_cli(["generate", PROMPT, "--model", str(tiny_model_dir), "--out", str(tmp_path / "x.png"),
                            "--budget-model", str(tiny_budget_dir), *extra], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and names in lines[0], err


def test_generate_auto_with_a_budget_model_for_another_model(tiny_model_dir, tmp_path, capsys):
    other = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other)
    weights = next((other / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x02")
    config = tiny_budget_config(other)
    save_budget_model(build_network(config), config, tmp_path / "budget")
    code, _, err = run_cli(["generate", PROMPT, "--model", str(tiny_model_dir), "--steps", "auto",
                            "--budget-model", str(tmp_path / "budget"), "--out", str(tmp_path / "x.png")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--budget-model" in lines[0]
    assert str(other) in lines[0] and str(tiny_model_dir) in lines[0]


def test_generate_auto_notes_a_truncated_prompt_and_another_scheduler(tiny_model_dir, tmp_path, capsys):
    config = tiny_budget_config(tiny_model_dir, max_text_length=8,
                                extra={"rendered_with": {"scheduler": "ddim", "guidance": 2.0}})
    save_budget_model(build_network(config), config, tmp_path / "budget")
    code, out, err = run_cli(["generate", PROMPT + " with a dotted texture", "--model", str(tiny_model_dir),
                              "--steps", "auto", "--budget-model", str(tmp_path / "budget"), "--scheduler", "euler",
                              "--out", str(tmp_path / "x.png")], capsys)
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    budget = record["budget"]
    assert budget["prompt_truncated"] is True and record["prompt_truncated"] is False  # the pipeline keeps 64 tokens
    assert any("truncated" in n for n in budget["notes"]) and any("scheduler ddim" in n for n in budget["notes"])
    assert "note:" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# bench_budget
# ------------------------------------------------------------------------------------------------
def test_bench_budget_end_to_end(trained, tiny_model_dir, monkeypatch):
    import yaml

    import mlops.params
    from benchmarks import bench_budget

    tmp_path, uri, _ = trained
    cfg = {"dataset": str(tmp_path / "dataset.parquet"), "model": str(tiny_model_dir),
           "budget_model": str(tmp_path / "budget"), "split": "test", "full_steps": 20,
           "plateau_epsilons": [0.01, 0.05], "quality_targets": [0.9, 0.99], "headline_rule": "plateau",
           "targets": {"min_steps_saved_pct": 50.0, "max_drop_pct": 2.0}, "timing_prompts": 2, "timing_repeats": 1,
           "report_path": str(tmp_path / "budget.json"), "plot_path": str(tmp_path / "budget.png"),
           "csv_path": str(tmp_path / "budget_tradeoff.csv"), "cross_validation": {"folds": 3, "seed": 0},
           "bootstrap": 50}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "bench_budget": cfg, "train_budget": train_cfg(tmp_path, tiny_model_dir, tmp_path / "dataset.parquet")}))
    monkeypatch.setattr(mlops.params, "PARAMS_FILE", tmp_path / "params.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    bench_budget.main()

    report = json.loads((tmp_path / "budget.json").read_text())
    assert report["prompts"] == 3 and report["step_grid"] == GRID and (tmp_path / "budget.png").stat().st_size > 0
    assert set(report["predictor_mae"]) == {"bilstm", "mlp", "train_mean_curve"}
    assert set(report["predictor_mae"]["bilstm"]["pixel/ssim"]) == {"mean", *map(str, GRID)}
    assert "reference_30" in report["predictor_mae"]["bilstm"]["pixel/lsnr"]
    head = report["headline"]
    eps = load_budget_predictor(tmp_path / "budget").config["rules"]["plateau_epsilon"]
    assert head["rule"] == f"plateau_eps={eps:g}" and head["predictor"] == "bilstm"
    assert head["steps_saved_pct"] == pytest.approx(100 * (1 - head["mean_steps"] / 20), abs=0.01)
    assert set(head["levels"]) == {"pixel", "mid", "high"}
    for level in head["levels"].values():
        assert {"quality", "quality_at_full", "drop_vs_full_pct", "uniform_same_mean_steps"} <= set(level)
    assert set(report["targets"]) == {"steps_saved_at_quality", "beats_uniform"}
    assert all(isinstance(t["met"], bool) for t in report["targets"].values())
    assert set(report["allocations"]) == {"bilstm", "mlp", "oracle"}
    assert set(report["allocations"]["bilstm"]) == {"plateau_eps=0.01", "plateau_eps=0.05", f"plateau_eps={eps:g}",
                                                    "quality_q=0.9", "quality_q=0.99"}
    q = report["allocations"]["bilstm"]["quality_q=0.9"]["regret_vs_oracle"]
    assert {"oracle_mean_steps", "extra_steps_mean", "target_met_fraction"} <= set(q)
    # The oracle meets its own quality target whenever the grid allows it.
    oracle = report["allocations"]["oracle"]["quality_q=0.9"]
    assert oracle["rule_met_on_grid_fraction"] == 1.0
    cost = report["prediction_cost"]
    assert cost["prompts"] == 2 and cost["predict_ms_median"] > 0 and cost["predict_pct_of_generation_median"] > 0
    table = pd.read_csv(tmp_path / "budget_tradeoff.csv")
    assert {"uniform", "bilstm", "mlp", "oracle"} == set(table["method"])
    cv = report["cross_validation"]  # the recipe judged on all 24 prompts, each by networks that never saw it
    assert cv["prompts"] == 24 and cv["folds"] == 3 and cv["targets"] == cv["bilstm"]["targets"]
    for level in [*head["levels"].values(), *cv["bilstm"]["levels"].values()]:
        lo, hi = level["margin_vs_uniform_bootstrap"]["ci95"]
        assert lo <= hi and 0 <= level["margin_vs_uniform_bootstrap"]["fraction_le_0"] <= 1


def test_margin_bootstrap():
    from benchmarks.bench_budget import margin_bootstrap

    grid = [2, 4, 8]
    rng = np.random.default_rng(0)
    q = {"pixel": np.sort(rng.uniform(0.5, 1.0, size=(40, 3)), axis=1)}
    # Every prompt at the same grid count is the uniform allocation: no margin in any resample.
    same = margin_bootstrap(np.full(40, 4), q, grid, 100)["pixel"]
    assert same["ci95"] == pytest.approx([0.0, 0.0], abs=1e-9)
    # Steps where they buy the most: half the prompts gain a lot from 8 steps, the rest nothing.
    q2 = {"pixel": np.where(np.arange(40)[:, None] < 20, [[0.5, 0.6, 1.0]], [[0.9, 0.9, 0.9]])}
    steps = np.where(np.arange(40) < 20, 8, 2)
    good = margin_bootstrap(steps, q2, grid, 200)["pixel"]
    assert good["ci95"][0] > 0 and good["fraction_le_0"] == 0.0
    # R allocations of the same prompts (repeated cross-validation): the good allocation and its
    # reverse judged together land between the two.
    reverse = np.where(np.arange(40) < 20, 2, 8)
    bad = margin_bootstrap(reverse, q2, grid, 200)["pixel"]
    mixed = margin_bootstrap(np.stack([steps, reverse]), q2, grid, 200)["pixel"]
    assert bad["ci95"][1] < 0 and bad["fraction_le_0"] == 1.0
    assert bad["ci95"][0] < mixed["ci95"][0] < good["ci95"][0] and bad["ci95"][1] < mixed["ci95"][1] < good["ci95"][1]
    twice = margin_bootstrap(np.stack([steps, steps]), q2, grid, 200)["pixel"]
    assert twice == good


def test_allocation_judges_repeated_allocations_together():
    from benchmarks.bench_budget import allocation
    from training.budget import CurveTable

    grid = [2, 4, 8]
    values = np.stack([np.tile([[0.5, 0.6, 1.0, 1.0]], (20, 1)), np.tile([[0.9, 0.9, 0.9, 1.0]], (20, 1))]).reshape(40, 1, 4)
    curves = CurveTable(prompt_ids=np.arange(40), prompts=[f"p{i}" for i in range(40)], splits=np.array(["test"] * 40),
                        complexity=np.ones(40, dtype=int), step_grid=grid, reference_steps=16, metrics=["pixel/ssim"],
                        values=values)
    q = {"pixel": values[:, 0, :3]}
    good, bad = np.where(np.arange(40) < 20, 8, 2), np.where(np.arange(40) < 20, 2, 8)
    rows = np.arange(40)
    one = allocation(good, curves, rows, q, 8, curves.metrics)
    both = allocation(np.stack([good, bad]), curves, rows, q, 8, curves.metrics)
    reversed_ = allocation(bad, curves, rows, q, 8, curves.metrics)
    assert one["levels"]["pixel"]["margin_vs_uniform"] > 0 > reversed_["levels"]["pixel"]["margin_vs_uniform"]
    assert both["levels"]["pixel"]["quality"] == pytest.approx(
        (one["levels"]["pixel"]["quality"] + reversed_["levels"]["pixel"]["quality"]) / 2, abs=1e-5)
    assert both["mean_steps"] == 5.0 and sum(both["histogram"].values()) == 80
    assert both["metrics"]["pixel/ssim"] == pytest.approx(both["levels"]["pixel"]["quality"], abs=1e-5)


def test_cross_validation_predicts_every_prompt_once_without_seeing_it(trained, tiny_model_dir, monkeypatch):
    import training.budget as tb
    from benchmarks import bench_budget

    tmp_path, _, _ = trained
    table = pd.read_parquet(tmp_path / "dataset.parquet")
    cfg = train_config(tmp_path, tiny_model_dir, tmp_path / "dataset.parquet")
    seen = []
    real_fit = tb.fit_network

    def spy(arch, network_config, cfg_, emb, z, train_rows, val_rows, logger=None, progress=True):
        seen.append((arch, set(train_rows.tolist()), set(val_rows.tolist())))
        return real_fit(arch, network_config, cfg_, emb, z, train_rows, val_rows, logger, progress)

    monkeypatch.setattr(tb, "fit_network", spy)
    targets = bench_budget.BudgetTargets(min_steps_saved_pct=50.0, max_drop_pct=2.0)
    cv = bench_budget.cross_validation(bench_budget.CrossValidation(folds=4, seed=1), cfg, table, 20, targets)
    assert cv["prompts"] == 24 and cv["prompts_per_fold"] == [6, 6, 6, 6] and len(seen) == 4 * 2
    # Every fit trains on two folds and validates on a third: no prompt is tested by a network that saw it.
    for arch, train_rows, val_rows in seen:
        assert len(train_rows) == 12 and len(val_rows) == 6 and not train_rows & val_rows
    tested = [set(range(24)) - tr - va for _, tr, va in seen[::2]]
    assert sorted(len(t) for t in tested) == [6] * 4 and set().union(*tested) == set(range(24))
    for arch in ("bilstm", "mlp"):
        row = cv[arch]
        assert len(row["plateau_epsilon_per_fold"]) == 1 and len(row["plateau_epsilon_per_fold"][0]) == 4
        assert set(row["targets"]) == {"steps_saved_at_quality", "beats_uniform"}
        assert len(row["repeats"]) == 1 and row["repeats"][0]["seed"] == 1
        assert row["repeats"][0]["mean_steps"] == row["mean_steps"]
        assert row["steps_saved_pct"] == pytest.approx(100 * (1 - row["mean_steps"] / 20), abs=0.01)
    assert set(cv["predictor_mae_mean"]) == {"bilstm", "mlp", "mean_curve"}
    assert all(np.isfinite(v) for by_m in cv["predictor_mae_mean"].values() for v in by_m.values())
    with pytest.raises(ValueError, match="at least 3"):
        tb.cross_validate(cfg, table, 2)

    # Repeated: two fold assignments (seeds 1, 2), each prompt allocated once per repeat, judged together.
    seen.clear()
    twice = bench_budget.cross_validation(bench_budget.CrossValidation(folds=4, seed=1, repeats=2), cfg, table, 20,
                                          targets)
    assert twice["repeats"] == 2 and twice["seeds"] == [1, 2] and len(seen) == 2 * 4 * 2
    row = twice["bilstm"]
    assert [r["seed"] for r in row["repeats"]] == [1, 2] and len(row["plateau_epsilon_per_fold"]) == 2
    assert sum(row["histogram"].values()) == 2 * 24
    assert row["mean_steps"] == pytest.approx(np.mean([r["mean_steps"] for r in row["repeats"]]), abs=1e-3)
    assert row["beats_uniform_repeats"].endswith(" of 2")


def test_bench_budget_rejects_another_grid(trained, tiny_model_dir):
    import yaml

    from benchmarks import bench_budget
    from conftest import REPO
    from mlops.params import config_from_dict

    tmp_path, _, _ = trained
    other = synthetic_dataset(8, grid=[2, 4, 8, 20])
    other.to_parquet(tmp_path / "other.parquet")
    section = yaml.safe_load((REPO / "params.yaml").read_text())["bench_budget"]
    cfg = config_from_dict(bench_budget.BenchBudgetConfig, {
        **section, "dataset": str(tmp_path / "other.parquet"), "model": str(tiny_model_dir),
        "budget_model": str(tmp_path / "budget")})
    with pytest.raises(BudgetModelMismatch, match=r"\[2, 4, 8, 20\].*other.parquet|other.parquet.*\[2, 4, 8, 20\]"):
        bench_budget.run(cfg)
