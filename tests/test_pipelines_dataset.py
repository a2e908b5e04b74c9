"""The ``score`` and ``dataset`` stages on a tiny render: every metric against the reference and
the prompt, the Parquet table's schema, the knee step, plots and report."""

import warnings
import json

import numpy as np
import pandas as pd
import pytest
import torch

import mlops.params
from budgetdiff.metrics import MetricScorer, ScoringConfig
from budgetdiff.metrics.perceptual import LpipsMetric
from budgetdiff.io.shards import ShardStore
from mlops.params import ParamsError, config_from_dict
from pipelines import dataset, render, score
from conftest import cli_error
from test_metrics_helpers import tiny_backbone, tiny_checker
from test_pipelines_render import write_prompts

METRICS = ["pixel/lsnr", "pixel/psnr", "pixel/ssim", "mid/lpips_alex_randinit", "high/clipt_domainclip",
           "high/iclip_domainclip", "domain/attr_acc"]
REFERENCE_BASED = ["pixel/psnr", "pixel/ssim", "mid/lpips_alex_randinit", "high/iclip_domainclip"]


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path_factory.mktemp("hub")))  # no ImageNet AlexNet: the randinit backend
    try:
        with warnings.catch_warnings():  # the randinit warning is given once per process
            warnings.simplefilter("ignore")
            lpips = LpipsMetric()
    finally:
        torch.hub.set_dir(previous)
    return MetricScorer(ScoringConfig(batch_size=8), lpips=lpips, clip=tiny_backbone(), checker=tiny_checker())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir, scorer):
    root = tmp_path_factory.mktemp("dataset")
    write_prompts(root / "prompts.parquet", 8)
    render.run(render_config(tiny_model_dir, root / "prompts.parquet", root / "renders", root / "render.json"),
               executor=render.local_executor(), progress=False)
    cfg = {"score": {"renders": str(root / "renders"), "prompts": str(root / "prompts.parquet"), "batch_size": 8,
                     "clip_dir": "unused", "attributes_dir": "unused", "output": str(root / "scores.parquet")},
           "dataset": {"prompts": str(root / "prompts.parquet"), "scores": str(root / "scores.parquet"),
                       "render_report": str(root / "render.json"), "output": str(root / "dataset.parquet"),
                       "knee": {"quality": 0.5, "metrics": {"pixel/ssim": "similarity", "mid/lpips": "distance",
                                                           "high/iclip": "similarity"}},
                       "plots_dir": str(root / "plots"), "figure_path": str(root / "dataset.png"),
                       "report_path": str(root / "dataset.json")}}
    score.run(score_config(cfg["score"]), scorer=scorer, progress=False)
    return root, cfg


def render_config(model, prompts, output_dir, report_path, **more) -> render.RenderConfig:
    return config_from_dict(render.RenderConfig, {
        "model": str(model), "prompts": str(prompts), "step_grid": [1, 2, 4], "reference_steps": 6,
        "scheduler": "ddim", "guidance": None, "batch_size": 3, "workers": 1, "output_dir": str(output_dir),
        "report_path": str(report_path), **more})


def score_config(section: dict, **changes) -> score.ScoreConfig:
    return config_from_dict(score.ScoreConfig, {**section, **changes})


def dataset_config(section: dict, **changes) -> dataset.DatasetConfig:
    return config_from_dict(dataset.DatasetConfig, {**section, **changes})


def test_score_table(workspace):
    root, _ = workspace
    table = pd.read_parquet(root / "scores.parquet")
    assert list(table.columns) == list(score.RECORD_COLUMNS) + METRICS
    assert len(table) == 8 * 4 and not table.duplicated(["prompt_id", "steps"]).any()
    grid, refs = table[~table["is_reference"]], table[table["is_reference"]]
    assert (refs["steps"] == 6).all() and len(refs) == 8
    assert grid[METRICS].notna().all().all() and refs[REFERENCE_BASED].isna().all().all()
    assert refs[["pixel/lsnr", "high/clipt_domainclip", "domain/attr_acc"]].notna().all().all()
    assert (table["nfe"] == table["steps"]).all()


def test_score_and_dataset_are_deterministic(workspace, scorer, tmp_path):
    """Scoring and building the dataset again give the same bytes (a fresh clone's re-run hashes
    to dvc.lock): no wall-clock column, no timestamp, a fixed row order."""
    root, cfg = workspace
    score.run(score_config(cfg["score"], output=str(tmp_path / "scores.parquet")), scorer=scorer, progress=False)
    assert (tmp_path / "scores.parquet").read_bytes() == (root / "scores.parquet").read_bytes()
    outputs = {"output": "dataset.parquet", "plots_dir": "plots", "figure_path": "dataset.png",
               "report_path": "dataset.json"}
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        dataset.run(dataset_config(cfg["dataset"], **{k: str(tmp_path / name / v) for k, v in outputs.items()}))
        runs.append({str(p.relative_to(tmp_path / name)): p.read_bytes()
                     for p in sorted((tmp_path / name).rglob("*")) if p.is_file()})
    assert len(runs[0]) == 3 + 7 + 1 and runs[0] == runs[1]


def test_score_reports_a_corrupt_shard(workspace, tmp_path, monkeypatch, capsys):
    import shutil

    import yaml

    root, cfg = workspace
    renders = tmp_path / "renders"
    shutil.copytree(root / "renders", renders)
    path = ShardStore(renders).data_path("s0002-p00001")
    path.write_bytes(path.read_bytes()[:-7] + b"garbage")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"score": {**cfg["score"], "renders": str(renders)}}))
    monkeypatch.setattr(mlops.params, "PARAMS_FILE", tmp_path / "params.yaml")
    message = cli_error(capsys, score.main)
    assert message.startswith(f"error: shard {path}: checksum mismatch")
    (renders / "index.json").unlink()
    assert "the render stage has not finished" in cli_error(capsys, score.main)


def test_dataset_table_plots_and_report(workspace):
    root, cfg = workspace
    report = dataset.run(dataset_config(cfg["dataset"]))
    table = pd.read_parquet(root / "dataset.parquet")
    expected = {"prompt_id": "int64", "prompt": "string", "seed": "int64", "split": "string", "complexity": "int64",
                "steps": "int64", "is_reference": "bool", "nfe": "int64", "knee_steps": "int64",
                **{m: "float64" for m in METRICS}}
    assert {c: str(t) for c, t in table.dtypes.items()} == expected and list(table.columns) == list(expected)
    assert report["rows"] == 32 and report["prompts"] == 8 and report["metrics"] == METRICS
    assert report["seeds_per_prompt"] == 1 and report["seed_agreement"] is None
    assert report["per_complexity"] == {"1": 2, "2": 2, "3": 2, "4": 2}
    assert table.groupby("prompt_id")["split"].nunique().max() == 1  # split by prompt
    assert set(table["knee_steps"]) <= {1, 2, 4, 6} and sum(report["knee"]["histogram"].values()) == 8
    assert report["knee"]["metrics"] == {"pixel/ssim": "similarity", "mid/lpips_alex_randinit": "distance",
                                         "high/iclip_domainclip": "similarity"}
    curve = pd.read_csv(root / "plots/curves/mid_lpips.csv")
    assert list(curve.columns) == ["steps", "complexity_1", "complexity_2", "complexity_3", "complexity_4", "all"]
    assert curve["steps"].tolist() == [1, 2, 4]
    assert {p.name for p in (root / "plots/curves").iterdir()} == {
        "pixel_lsnr.csv", "pixel_psnr.csv", "pixel_ssim.csv", "mid_lpips.csv", "high_clipt.csv", "high_iclip.csv",
        "domain_attr.csv"}
    histogram = pd.read_csv(root / "plots/knee_histogram.csv")
    assert histogram["knee_steps"].tolist() == ["001", "002", "004", "not reached by 4"]
    assert (root / "dataset.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((root / "dataset.json").read_text())["rows"] == 32


def test_several_seeds_per_prompt(workspace, scorer, tiny_model_dir, tmp_path):
    """render.seeds_per_prompt = 2: every image is scored against the reference of its own seed,
    the dataset has a row (and a knee) per seed, and the budget curves average the seeds."""
    import shutil

    from training.budget import dataset_curves

    root, cfg = workspace
    shutil.copytree(root / "renders", tmp_path / "renders")
    _, log = render.run(render_config(tiny_model_dir, root / "prompts.parquet", tmp_path / "renders",
                                      tmp_path / "render.json", seeds_per_prompt=2),
                        executor=render.local_executor(), progress=False)
    assert log["shards_reused"] == 12 and log["shards_rendered"] == 12
    scores = score.run(score_config(cfg["score"], renders=str(tmp_path / "renders"),
                                    output=str(tmp_path / "s.parquet")), scorer=scorer, progress=False)
    assert len(scores) == 8 * 2 * 4 and not scores.duplicated(["prompt_id", "seed", "steps"]).any()
    single = pd.read_parquet(root / "scores.parquet")
    first = scores.merge(single[["prompt_id", "seed"]].drop_duplicates(), on=["prompt_id", "seed"])
    # The first seed's rows are the single-seed run's, reference-based metrics included.
    pd.testing.assert_frame_equal(first.reset_index(drop=True), single.reset_index(drop=True), check_exact=False,
                                  atol=1e-6)
    second = scores[~scores.set_index(["prompt_id", "seed"]).index.isin(first.set_index(["prompt_id", "seed"]).index)]
    assert (second["seed"].to_numpy() == second["prompt_id"].map(
        single.drop_duplicates("prompt_id").set_index("prompt_id")["seed"]).to_numpy() + 100_000).all()
    grid = second[~second["is_reference"]]
    assert grid["pixel/ssim"].notna().all() and not np.allclose(
        grid.sort_values(["prompt_id", "steps"])["pixel/ssim"].to_numpy(),
        first[~first["is_reference"]].sort_values(["prompt_id", "steps"])["pixel/ssim"].to_numpy())

    out = {**cfg["dataset"], "scores": str(tmp_path / "s.parquet"), "render_report": str(tmp_path / "render.json"),
           "output": str(tmp_path / "d.parquet"), "plots_dir": str(tmp_path / "plots"),
           "figure_path": str(tmp_path / "d.png"), "report_path": str(tmp_path / "d.json")}
    report = dataset.run(dataset_config(out))
    table = pd.read_parquet(tmp_path / "d.parquet")
    assert report["rows"] == 64 and report["prompts"] == 8 and report["seeds_per_prompt"] == 2
    assert sum(report["knee"]["histogram"].values()) == 16
    assert (table.groupby(["prompt_id", "seed"])["knee_steps"].nunique() == 1).all()
    agreement = report["seed_agreement"]
    assert set(agreement) == set(report["knee"]["metrics"])
    assert all(a["steps"] == [1, 2, 4] and all(-1 <= r <= 1 for r in a["correlation"]) for a in agreement.values())
    curves = dataset_curves(table)
    assert (curves.seeds == 2).all()
    i = curves.metrics.index("pixel/ssim")
    expected = table[~table["is_reference"]].groupby(["prompt_id", "steps"])["pixel/ssim"].mean().unstack()
    np.testing.assert_allclose(curves.values[:, i, :-1], expected.loc[curves.prompt_ids].to_numpy())


def test_seed_agreement():
    rng = np.random.default_rng(0)
    prompt_effect = rng.normal(size=50)
    rows = []
    for pid in range(50):
        for seed in (7, 3):  # ordered by seed, not by row order
            same = prompt_effect[pid]
            noise = rng.normal()
            rows += [{"prompt_id": pid, "seed": seed, "steps": 2, "is_reference": False, "a": same, "b": noise},
                     {"prompt_id": pid, "seed": seed, "steps": 9, "is_reference": True, "a": np.nan, "b": np.nan}]
    out = dataset.seed_agreement(pd.DataFrame(rows), ["a", "b"])
    assert out["a"] == {"steps": [2], "correlation": [1.0], "mean": 1.0}   # the prompt decides
    assert abs(out["b"]["mean"]) < 0.3                          # the seed decides
    assert dataset.seed_agreement(pd.DataFrame(rows).query("seed == 7"), ["a"]) is None


def test_knee_rule():
    steps = [2, 4, 8, 16, 32]
    rows = []
    for pid, ssim, lpips in [(0, [0.5, 0.95, 0.85, 0.97, 0.99], [0.3, 0.05, 0.05, 0.05, 0.0]),  # dips at 8: 16
                             (1, [0.95] * 5, [0.02] * 5),                                      # reached at 2
                             (2, [0.95] * 5, [0.5, 0.4, 0.3, 0.2, 0.15])]:                     # never: reference
        rows += [{"prompt_id": pid, "steps": s, "is_reference": False, "pixel/ssim": a, "mid/lpips_x": b}
                 for s, a, b in zip(steps, ssim, lpips)]
        rows.append({"prompt_id": pid, "steps": 64, "is_reference": True, "pixel/ssim": np.nan, "mid/lpips_x": np.nan})
    table = pd.DataFrame(rows)
    metrics = dataset.resolve_knee_metrics(table, {"pixel/ssim": "similarity", "mid/lpips": "distance"})
    assert metrics == {"pixel/ssim": "similarity", "mid/lpips_x": "distance"}
    assert dataset.knee_steps(table, metrics, 0.9, 64).to_dict() == {0: 16, 1: 2, 2: 64}
    with pytest.raises(ValueError, match="no metric column matches 'high/iclip'"):
        dataset.resolve_knee_metrics(table, {"high/iclip": "similarity"})


def test_dataset_config_refuses_a_bad_knee_kind():
    section = {"prompts": "p", "scores": "s", "render_report": "r", "output": "o", "plots_dir": "d",
               "figure_path": "f", "report_path": "j", "knee": {"quality": 0.9, "metrics": {"pixel/ssim": "similar"}}}
    with pytest.raises(ParamsError, match=r"knee: metrics.pixel/ssim: expected one of 'similarity', 'distance'"):
        dataset_config(section)
    assert dataset_config(section, knee={"quality": 1, "metrics": {"mid/lpips": "distance"}}).knee == \
        dataset.KneeConfig(quality=1.0, metrics={"mid/lpips": "distance"})
