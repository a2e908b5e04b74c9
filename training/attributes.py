"""Train the attribute checker: a small CNN that reads shape, colour, size, texture and position
of every object (a 3x3 grid of cells) and the background of a rendered scene.

Recipe:
- Data: scenes sampled and rendered on the fly with their ground-truth specs (never repeating),
  1 to 4 objects (``count_weights``); augmentation so it also judges imperfect (generated)
  images: Gaussian pixel noise (σ ~ U[0, ``noise_aug``]) and a Gaussian blur (σ ~ U[0.1,
  ``blur_aug``]), each on half of the images.
- Loss: ``budgetdiff.domain.evaluators.attribute_loss`` (occupancy BCE + per-cell cross-entropies +
  background CE); AdamW, linear warm-up then cosine decay.
- Held-out metrics: ``attr_check`` accuracies on ``eval_scenes_per_count`` held-out scenes of
  each object count 1 to 4 (target: >= 95 % on every attribute of 1-object scenes).

``train(cfg) -> metrics`` is the plain entry point (DVC stage ``train_attributes``, tests), with
``cfg`` a ``TrainAttributesConfig``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader, IterableDataset

from budgetdiff.domain.evaluators import (
    AttributeChecker,
    attribute_loss,
    attribute_targets,
    check_scenes,
    save_attribute_checker,
    summarize_attribute_checks,
)
from budgetdiff.domain.scenes import SceneSpec, held_out_scenes, level_seed, render_scene_array, sample_scene
from mlops.params import config_dict
from training.batches import stack_columns
from training.trainer import make_trainer, warmup_cosine_scheduler

HELD_OUT_SEED_OFFSET = 40_000_000  # evaluation scenes: a seed range no training stream reaches


@dataclass(frozen=True)
class TrainAttributesConfig:
    """params.yaml's ``train_attributes`` section."""

    seed: int
    resolution: int
    channels: list[int]
    hidden: int
    count_weights: list[float]
    noise_aug: float
    blur_aug: float
    batch_size: int
    max_steps: int
    lr: float
    weight_decay: float
    warmup_fraction: float
    val_every: int  # 0: no held-out checks during training
    val_scenes_per_count: int
    eval_scenes_per_count: int
    output_dir: str
    metrics_path: str


class SpecSceneStream(IterableDataset):
    """Endless stream of (image (3, R, R) in [0, 1], spec dict) rendered from random seeds."""

    def __init__(self, seed: int, resolution: int, count_weights: list[float]):
        self.seed, self.resolution, self.count_weights = seed, resolution, tuple(count_weights)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1000 + (info.id if info else 0))
        while True:
            spec = sample_scene(rng.randrange(HELD_OUT_SEED_OFFSET), count_weights=self.count_weights)
            image = torch.from_numpy(render_scene_array(spec, self.resolution).copy()).permute(2, 0, 1).float() / 255.0
            yield image, spec.to_dict()


def _collate(batch):
    """(images, targets): the checker's training targets are built here, as tensors, so that
    Lightning can move the batch to the device."""
    images, specs = stack_columns(batch)
    return images, attribute_targets([SceneSpec.from_dict(s) for s in specs])


def augment(images: torch.Tensor, noise_aug: float, blur_aug: float) -> torch.Tensor:
    """Blur half of the images (3x3 Gaussian, one σ ~ U[0.1, blur_aug] per batch), then add
    Gaussian noise (σ ~ U[0, noise_aug] per image) to half; images stay in [0, 1]."""
    n = images.shape[0]
    if blur_aug > 0:
        blurred = TF.gaussian_blur(images, [3, 3], [random.uniform(0.1, blur_aug)])
        pick = (torch.rand(n, 1, 1, 1) < 0.5).to(images.dtype)
        images = pick * blurred + (1 - pick) * images
    if noise_aug > 0:
        sigma = torch.rand(n, 1, 1, 1) * noise_aug * (torch.rand(n, 1, 1, 1) < 0.5)
        images = images + torch.randn_like(images) * sigma
    return images.clamp(0, 1)


def held_out_accuracy(checker: AttributeChecker, n_per_count: int, resolution: int,
                      offset: int = HELD_OUT_SEED_OFFSET) -> dict[str, dict[str, float]]:
    """``attr_check`` accuracies on ``n_per_count`` held-out rendered scenes per object count."""
    checker.eval()
    out = {}
    for k in (1, 2, 3, 4):
        specs, _ = held_out_scenes(n_per_count, level_seed(offset, k, 0), n_objects=k)
        images = np.stack([render_scene_array(s, resolution) for s in specs])
        out[f"{k}obj"] = summarize_attribute_checks(check_scenes(checker, images, specs))
    return out


class AttributeCheckerModule(L.LightningModule):
    """Trains the attribute checker on rendered scenes with their ground-truth specs."""

    def __init__(self, cfg: TrainAttributesConfig):
        super().__init__()
        self.save_hyperparameters({"cfg": config_dict(cfg)})
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.checker = AttributeChecker(cfg.resolution, tuple(cfg.channels), cfg.hidden)

    def model_step(self, batch) -> torch.Tensor:
        images, targets = batch
        if self.training:
            images = augment(images, self.cfg.noise_aug, self.cfg.blur_aug)
        return attribute_loss(self.checker(images), targets)

    def training_step(self, batch, batch_idx):
        loss = self.model_step(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        every = self.cfg.val_every
        if every and self.global_step % every == 0:
            acc = held_out_accuracy(self.checker, self.cfg.val_scenes_per_count, self.cfg.resolution)
            self.log_dict({f"val/{k}/{a}": v for k, m in acc.items() for a, v in m.items()}, on_step=True, on_epoch=False)
            self.checker.train()

    def configure_optimizers(self):
        cfg = self.cfg
        opt = torch.optim.AdamW(self.checker.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, int(cfg.warmup_fraction * cfg.max_steps))
        return {"optimizer": opt, "lr_scheduler": warmup_cosine_scheduler(opt, cfg.max_steps, warmup)}


def train(cfg: TrainAttributesConfig) -> dict[str, Any]:
    """Train the checker per ``cfg`` (the ``train_attributes`` params section), save it to
    ``cfg.output_dir`` (config.json + model.safetensors), return held-out accuracies."""
    from mlops.tracking import mlflow_logger

    L.seed_everything(cfg.seed, workers=True)
    module = AttributeCheckerModule(cfg)
    loader = DataLoader(SpecSceneStream(cfg.seed, cfg.resolution, cfg.count_weights),
                        batch_size=cfg.batch_size, collate_fn=_collate, num_workers=0)
    logger = mlflow_logger("train_attributes", run_name="train_attributes")
    trainer = make_trainer(logger, mixed_precision=False, max_steps=cfg.max_steps,
                           log_every_n_steps=max(1, min(10, cfg.max_steps // 2)), limit_val_batches=0)
    t0 = time.time()
    trainer.fit(module, loader)
    train_seconds = time.time() - t0

    checker = module.checker.cpu().eval()
    held_out = held_out_accuracy(checker, cfg.eval_scenes_per_count, cfg.resolution)
    save_attribute_checker(checker, cfg.output_dir,
                           extra={"stage": "train_attributes", "steps": int(trainer.global_step)})
    metrics = {
        "steps": int(trainer.global_step),
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / max(1, trainer.global_step), 4),
        "parameters": sum(p.numel() for p in checker.parameters()),
        "eval_scenes_per_count": cfg.eval_scenes_per_count,
        "held_out": held_out,
        "final_train_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
    }
    logger.log_metrics({f"held_out/{k}/{a}": v for k, m in held_out.items() for a, v in m.items()})
    logger.experiment.log_dict(logger.run_id, metrics, "train_attributes_metrics.json")
    return metrics


def main() -> None:
    from budgetdiff.io import atomic_write_json as write_json
    from mlops.params import load_config

    cfg = load_config("train_attributes", TrainAttributesConfig)
    metrics = train(cfg)
    write_json(cfg.metrics_path, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "held_out"}))
    for k, m in metrics["held_out"].items():
        print(k, " ".join(f"{a}={v:.3f}" for a, v in m.items()))


if __name__ == "__main__":
    main()
