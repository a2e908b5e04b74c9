"""The default workflow end to end with the tiny profile: `dvc repro` in a scratch workspace.

The workspace has this repository's dvc.yaml and code, and params.yaml merged with
params.tiny.yaml. A second `dvc repro` must reuse every output (nothing retrains). Then, as on a
fresh clone, the git-ignored data/ is deleted: `dvc repro` renders, scores and builds the
dataset again, byte for byte what dvc.lock records, so no stage below them re-runs and
`dvc status` is clean but for `register`, which is always_changed (it checks the tracking store,
which DVC does not see) and rewrites reports/registry.json byte for byte.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.workflow  # `make test` runs it as its own step, after the fast tests

CODE_DIRS = ("budgetdiff", "mlops", "training", "benchmarks", "pipelines", "registry", "serving", "monitoring")
# Stages left out of the tiny run: bench_serve starts a Ray Serve cluster and drives load for
# minutes (tests/test_serving_e2e.py covers the service end to end); tune_skip runs Ray Tune
# trials (tests/test_tune_skip.py covers its tuning, the Ray runs in `make test-integration`); bench_monitor runs a
# Serve cluster and Prometheus under load (tests/test_monitoring*.py cover its parts); headlines
# reads every stage's report, those three included (tests/test_headlines.py covers it).
EXCLUDED_STAGES = {"bench_serve", "tune_skip", "bench_monitor", "headlines"}


def targets() -> list[str]:
    """Every stage of dvc.yaml (foreach groups by name) but the excluded ones."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return [name for name in stages if name not in EXCLUDED_STAGES]


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def make_workspace(path):
    for name in CODE_DIRS:
        (path / name).symlink_to(REPO / name, target_is_directory=True)
    shutil.copy(REPO / "dvc.yaml", path / "dvc.yaml")
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                   yaml.safe_load((REPO / "params.tiny.yaml").read_text()))
    (path / "params.yaml").write_text(yaml.safe_dump(params))


def dvc(args, cwd, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def ran_stages(stdout: str) -> list[str]:
    """The stages a `dvc repro` ran, in order."""
    return [line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage")]


def check_dataset(tmp_path, env):
    """The prompts -> render (Ray) -> score -> dataset stages of the tiny profile."""
    import pandas as pd

    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    n, grid = params["prompts"]["n_prompts"], params["render"]["step_grid"]
    table = pd.read_parquet(tmp_path / "data/dataset.parquet")
    metrics = ["pixel/lsnr", "pixel/psnr", "pixel/ssim", "mid/lpips_alex_randinit", "high/clipt_domainclip",
               "high/iclip_domainclip", "domain/attr_acc"]
    assert list(table.columns) == ["prompt_id", "prompt", "seed", "split", "complexity", "steps", "is_reference",
                                   "nfe", "knee_steps", *metrics]
    seeds = params["render"].get("seeds_per_prompt", 1)
    assert len(table) == n * seeds * (len(grid) + 1) and not table.duplicated(["prompt_id", "seed", "steps"]).any()
    assert (table.groupby("prompt_id")["seed"].nunique() == seeds).all()
    assert set(table["steps"]) == {*grid, params["render"]["reference_steps"]}
    assert table.groupby("prompt_id")["split"].nunique().max() == 1 and set(table["complexity"]) == {1, 2, 3, 4}
    grid_rows = table[~table["is_reference"]]
    assert grid_rows[metrics].notna().all().all() and (grid_rows["nfe"] == grid_rows["steps"]).all()
    report = json.loads((tmp_path / "reports/dataset.json").read_text())
    assert report["rows"] == len(table) and report["prompts"] == n and report["seeds_per_prompt"] == seeds
    assert (report["seed_agreement"] is None) == (seeds == 1)
    assert {"median", "iqr", "histogram"} <= set(report["knee"])
    render = json.loads((tmp_path / "reports/render.json").read_text())
    assert render["images"] == len(table) and "seconds" not in json.dumps(render)
    run_log = json.loads((tmp_path / "logs/render_run.json").read_text())
    assert run_log["executor"] == "ray" and run_log["shards_rendered"] == render["shards"]
    speed = json.loads((tmp_path / "reports/bench_render.json").read_text())
    assert set(speed["images_per_s"]) == {"1", "2"} and speed["host"]["cpu_count"] >= 1
    assert (tmp_path / "reports/dataset.png").is_file()
    plots = dvc(["plots", "show", "-o", str(tmp_path / "dvc_plots")], tmp_path, env)
    assert plots.returncode == 0 and (tmp_path / "dvc_plots/index.html").is_file(), plots.stderr[-2000:]


def check_budget(tmp_path):
    """train_budget -> models/budget (BiLSTM + MLP ablation); bench_budget -> reports/budget.json."""
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    config = json.loads((tmp_path / "models/budget/config.json").read_text())
    assert config["step_grid"] == params["render"]["step_grid"]
    assert config["reference_steps"] == params["render"]["reference_steps"]
    assert config["model"]["path"] == "models/base" and len(config["model"]["unet_sha256"]) == 16
    assert (tmp_path / "models/budget/model.safetensors").is_file()
    assert json.loads((tmp_path / "models/budget/mlp/config.json").read_text())["architecture"] == "mlp"
    assert "val_mae" in json.loads((tmp_path / "reports/train_budget.json").read_text())["bilstm"]
    report = json.loads((tmp_path / "reports/budget.json").read_text())
    assert report["step_grid"] == params["render"]["step_grid"] and report["prompts"] > 0
    assert set(report["predictor_mae"]) == {"bilstm", "mlp", "train_mean_curve"}
    assert set(report["targets"]) == {"steps_saved_at_quality", "beats_uniform"}
    assert report["headline"]["mean_steps"] > 0 and report["prediction_cost"]["predict_ms_median"] > 0
    assert (tmp_path / "reports/budget.png").is_file() and (tmp_path / "reports/budget_tradeoff.csv").is_file()


def check_engine(tmp_path):
    """bundle -> models/bundle (loads, names what was measured); bench_auto -> reports/auto.json;
    register -> reports/registry.json."""
    from budgetdiff.generation.bundle import load_bundle

    bundle = load_bundle(tmp_path / "models/bundle")
    assert bundle.student is not None and bundle.auto is not None and bundle.skip_policy.schedulers
    auto = json.loads((tmp_path / "reports/auto.json").read_text())
    assert {"full", "budget", "adaptive", "student", "auto", "uniform_equal_nfe"} <= set(auto["results"])
    assert set(auto["targets"]) >= {"auto_gflops_reduction", "engine_overhead"} and auto["calibration"]
    assert (tmp_path / "reports/auto.png").is_file() and (tmp_path / "reports/auto_headline.json").is_file()
    registry = json.loads((tmp_path / "reports/registry.json").read_text())
    assert registry


def test_tiny_profile_dvc_repro(tmp_path):
    make_workspace(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    assert dvc(["init", "--no-scm", "-q"], tmp_path, env).returncode == 0
    # about 28 min alone on two cores since the promise gate and the typed records (measured 2026-12-06);
    first = dvc(["repro", *targets()], tmp_path, env, timeout=3000)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    assert (tmp_path / "models/base/model_index.json").is_file()
    assert (tmp_path / "reports/base_samples.png").is_file()
    report = json.loads((tmp_path / "reports/base.json").read_text())
    assert set(report["levels"]) == {"1", "2", "3", "4"}
    assert report["levels"]["1"]["checkers_on_ground_truth"]["heuristic"]["color"] > 0.5
    assert "attr_acc" in report["levels"]["1"]["model"]["checker"]
    assert (tmp_path / "models/clip").is_dir() and (tmp_path / "reports/metrics.json").is_file()
    assert "default_guidance" in json.loads((tmp_path / "reports/train_base.json").read_text())
    finetune = json.loads((tmp_path / "reports/finetune_base.json").read_text())
    assert finetune["init_from"] == "models/base_pretrain" and finetune["steps"] == 3
    assert (tmp_path / "models/base_pretrain/unet/config.json").is_file()
    check_dataset(tmp_path, env)
    check_budget(tmp_path)
    # bench_distill pairs the CFG-aware and vanilla students of training seeds 0-2 (distill_8@*_seedN).
    distill = json.loads((tmp_path / "reports/distill.json").read_text())
    seeds = distill["targets"]["clipt_student_8_cfg_ge_student_8_vanilla"]["training_seeds"]
    assert len(seeds["pairs"]) == len(seeds["difference_by_seed"]) == 3
    assert (tmp_path / "models/student-8-vanilla-seed2/unet/config.json").is_file()

    check_engine(tmp_path)
    registry = (tmp_path / "reports/registry.json").read_bytes()
    second = dvc(["repro", *targets()], tmp_path, env)
    assert second.returncode == 0
    # register is always_changed (the tracking store is outside DVC's view): it runs, finds its
    # version, judgement and champion in place and rewrites the same report; nothing else runs
    assert "didn't change, skipping" in second.stdout and ran_stages(second.stdout) == ["register"], second.stdout
    assert (tmp_path / "reports/registry.json").read_bytes() == registry

    # A fresh clone has no data/ (git-ignored): the data stages run again and hash to dvc.lock.
    tracked = {p: (tmp_path / p).read_bytes() for p in ("dvc.lock", "reports/render.json", "reports/dataset.json",
                                                        "reports/dataset.png", "reports/registry.json")}
    shutil.rmtree(tmp_path / "data")
    shutil.rmtree(tmp_path / ".dvc/cache", ignore_errors=True)  # a clone has no DVC cache either
    third = dvc(["repro", *targets()], tmp_path, env, timeout=900)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert sorted(ran_stages(third.stdout)) == ["dataset", "prompts", "register", "render", "score"], third.stdout
    assert {p: (tmp_path / p).read_bytes() for p in tracked} == tracked
    status = dvc(["status", *targets()], tmp_path, env)  # the excluded stages never ran here
    # every stage up to date but register, which DVC lists as "always changed" by design
    assert status.returncode == 0 and status.stdout.split() == ["register:", "always", "changed"], status.stdout
