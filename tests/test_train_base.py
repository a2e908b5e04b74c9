"""A tiny end-to-end run of the base model's training: train, resume, save, load, generate."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO


def tiny_train_config(tmp_path, **overrides):
    """params.yaml's train_base section, shrunk, as the typed config ``train`` takes."""
    from mlops.params import config_from_dict
    from training.base import TrainBaseConfig

    cfg = yaml.safe_load((REPO / "params.yaml").read_text())["train_base"]
    cfg.update(
        resolution=16, batch_size=4, max_steps=4, val_every=2, val_prompts=2, val_steps=2,
        guidance_candidates=[1.0, 2.0], guidance_eval_prompts=2, checkpoint_every=2,
        checkpoint_dir=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "base"),
        metrics_path=str(tmp_path / "train_base.json"),
    )
    cfg["unet"] = {**cfg["unet"], "block_out_channels": [8, 16], "cross_attention_levels": [False, True],
                   "norm_num_groups": 4, "attention_head_dim": 4}
    return config_from_dict(TrainBaseConfig, {**cfg, **overrides})


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_train_save_load_generate_and_resume(tmp_path, mlflow_uri):
    from diffusers import DiffusionPipeline

    from budgetdiff.generation.pipeline import BudgetDiffusionPipeline
    from training.base import config_hash, train

    cfg = tiny_train_config(tmp_path)
    metrics = train(cfg)
    assert metrics["steps"] == 4
    assert metrics["default_guidance"] in (1.0, 2.0)
    ckpt = tmp_path / "ckpt" / config_hash(cfg) / "last.ckpt"
    assert ckpt.is_file()
    assert not any(k.startswith("text_encoder.") for k in torch.load(ckpt, weights_only=False)["state_dict"])

    pipe = DiffusionPipeline.from_pretrained(cfg.output_dir)
    assert isinstance(pipe, BudgetDiffusionPipeline)
    assert pipe.config.default_guidance_scale == metrics["default_guidance"]
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a small red circle at the top left on a white background", num_inference_steps=3, output_type="np")
    assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()

    # Interrupted work resumes: a longer run with the same config continues from the checkpoint.
    longer = dataclasses.replace(cfg, max_steps=6)
    ckpt_longer = tmp_path / "ckpt" / config_hash(longer)
    ckpt_longer.mkdir(parents=True)
    ckpt.rename(ckpt_longer / "last.ckpt")
    assert train(longer)["steps"] == 6

    # MLflow recorded the run with the commit and stage tags.
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["budgetdiff"])
    assert len(runs) == 2
    assert set(runs["tags.dvc_stage"]) == {"train_base"}
    assert "metrics.final/default_guidance" in runs.columns  # train/loss logs every 10 steps


def test_version2_training_validates_composition_and_detail_and_logs_the_curve(tmp_path, mlflow_uri):
    from training.base import train

    cfg = tiny_train_config(
        tmp_path, material_prob=0.5, speckle_prob=0.3, max_steps=2, curve_path=str(tmp_path / "curve.jsonl"),
        val_composition={"counts": [2], "prompts_per_count": 2, "checker": str(REPO / "models/attributes"),
                         "detail_prompts": 2, "detail_short_steps": 1})
    train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2] and lines[0]["images_seen"] == 2 * cfg.batch_size
    for key in ("all_attributes_2obj", "detail_score", "detail_score_short"):
        assert 0.0 <= lines[0][key] <= 1.0


def test_version2_stream_carries_detail_and_version1_stream_does_not():
    from budgetdiff.domain.scenes import parse_prompt
    from training.base import SceneStream

    v1 = iter(SceneStream(0, 16, [0.25] * 4))
    v2 = iter(SceneStream(0, 16, [0.25] * 4, material_prob=1.0))
    for _ in range(8):
        (_, _, p1), (_, _, p2) = next(v1), next(v2)
        assert parse_prompt(p1).material == "plain" and parse_prompt(p2).material != "plain"


def test_a_few_steps_reduce_the_loss(tmp_path):
    from training.base import BaseDiffusionModule, SceneStream
    from training.batches import stack_columns

    cfg = tiny_train_config(tmp_path)
    torch.manual_seed(0)
    module = BaseDiffusionModule(cfg)
    stream = iter(SceneStream(0, cfg.resolution, cfg.count_weights))
    batch = stack_columns([next(stream) for _ in range(8)])
    opt = torch.optim.AdamW(module.unet.parameters(), lr=3e-3)

    def loss_at_fixed_noise():
        torch.manual_seed(123)
        import random

        random.seed(123)
        with torch.no_grad():
            return module.model_step(batch).item()

    before = loss_at_fixed_noise()
    for step in range(30):
        torch.manual_seed(step)
        loss = module.model_step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_at_fixed_noise() < 0.8 * before


def test_update_ema_warms_up_then_caps_the_decay():
    from training.base import update_ema

    ema, model = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    ema.weight.data.fill_(0.0)
    model.weight.data.fill_(1.0)
    update_ema(ema, model, step=0, max_decay=0.999)       # decay (1 + 0) / (10 + 0) = 0.1
    assert ema.weight.item() == pytest.approx(0.9)
    update_ema(ema, model, step=10_000, max_decay=0.99)   # capped at 0.99
    assert ema.weight.item() == pytest.approx(0.9 + 0.1 * 0.01)


def test_stack_columns_stacks_tensors_and_lists_the_rest():
    import torch

    from training.batches import stack_columns

    batch = [(torch.full((2, 3), float(i)), torch.tensor([i]), f"prompt {i}", {"seed": i}) for i in range(3)]
    xs, masks, prompts, specs = stack_columns(batch)
    assert xs.shape == (3, 2, 3) and torch.equal(xs[:, 0, 0], torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(masks, torch.tensor([[0], [1], [2]]))
    assert prompts == ["prompt 0", "prompt 1", "prompt 2"] and isinstance(prompts, list)
    assert specs == [{"seed": 0}, {"seed": 1}, {"seed": 2}]
