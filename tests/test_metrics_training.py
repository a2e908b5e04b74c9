"""Tiny end-to-end runs of train_clip, train_attributes and bench_metrics (a few steps each)."""

import json

import pytest

from test_metrics_helpers import TINY_CLIP_CFG


def tiny_clip_config(tmp_path):
    from mlops.params import config_from_dict
    from training.clip import TrainClipConfig

    return config_from_dict(TrainClipConfig, {**TINY_CLIP_CFG, "seed": 0, "count_weights": [0.25] * 4, "noise_aug": 0.05, "batch_size": 8,
            "max_steps": 3, "lr": 1e-3, "weight_decay": 0.05, "warmup_fraction": 0.05, "grad_clip": 1.0,
            "val_every": 2, "eval_scenes": 12, "output_dir": str(tmp_path / "clip"),
            "metrics_path": str(tmp_path / "train_clip.json")})


def tiny_attributes_config(tmp_path):
    from mlops.params import config_from_dict
    from training.attributes import TrainAttributesConfig

    return config_from_dict(TrainAttributesConfig, {"seed": 0, "resolution": 32, "channels": [4, 8, 8], "hidden": 16, "count_weights": [0.25] * 4,
            "noise_aug": 0.05, "blur_aug": 0.6, "batch_size": 8, "max_steps": 3, "lr": 2e-3, "weight_decay": 1e-4,
            "warmup_fraction": 0.03, "val_every": 2, "val_scenes_per_count": 3, "eval_scenes_per_count": 4,
            "output_dir": str(tmp_path / "attributes"), "metrics_path": str(tmp_path / "train_attributes.json")})


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_train_both_evaluators_then_bench(tmp_path, mlflow_uri):
    import mlflow

    from benchmarks.bench_metrics import BenchMetricsConfig
    from benchmarks.bench_metrics import run as bench
    from budgetdiff.domain.evaluators import load_attribute_checker
    from budgetdiff.metrics.semantic import load_clip_backbone
    from training.attributes import train as train_attributes
    from training.clip import train as train_clip

    clip_metrics = train_clip(tiny_clip_config(tmp_path))
    assert clip_metrics["steps"] == 3 and 0.0 <= clip_metrics["held_out/image_to_text_top1"] <= 1.0
    assert load_clip_backbone(tmp_path / "clip").name == "domainclip"

    attr_metrics = train_attributes(tiny_attributes_config(tmp_path))
    assert attr_metrics["steps"] == 3 and set(attr_metrics["held_out"]) == {"1obj", "2obj", "3obj", "4obj"}
    load_attribute_checker(tmp_path / "attributes")

    report = bench(BenchMetricsConfig(
        clip_dir=str(tmp_path / "clip"), attributes_dir=str(tmp_path / "attributes"), retrieval_scenes=12,
        attr_scenes_per_count=4, fd_images=8, fd_noise_sigmas=[0.2], throughput_images=16, batch_size=8,
        report_path=str(tmp_path / "metrics.json")))
    json.dumps(report)  # the report is plain JSON
    assert report["domain_clip_retrieval"]["candidates"] == 12
    assert set(report["attribute_checker"]) >= {"1obj", "2obj", "3obj", "4obj"}
    assert report["fd_sanity"]["metric"] == "dist/fd_domainclip"
    assert report["throughput"]["all_metrics_images_per_s"] > 0

    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["budgetdiff"])
    assert set(runs["tags.dvc_stage"]) == {"train_clip", "train_attributes"}
    assert "metrics.train/loss" in runs.columns
