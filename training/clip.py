"""Train the domain CLIP: a small open_clip model on rendered scenes and their prompts.

Recipe:
- Model: a custom open_clip config registered with ``open_clip.add_model_config`` (see
  ``budgetdiff.domain.evaluators.domain_clip_model_cfg``): a ViT on 32x32 images (patch 4) and a small
  text transformer over open_clip's built-in CLIP BPE tokenizer; random initialisation only.
- Data: scenes sampled and rendered on the fly (never repeating), each with one of the domain's
  phrasings of its prompt; mild Gaussian pixel noise on half of the images so the encoder also
  accepts imperfect (generated) images.
- Loss: open_clip's ``ClipLoss`` (symmetric InfoNCE, Radford et al. 2021, with a learned
  temperature); AdamW with linear warm-up then cosine decay.
- Held-out metric: image-to-text top-1 retrieval accuracy over ``eval_scenes`` held-out scenes
  (a retrieved prompt counts as correct when it describes the same canonical scene).

``train(cfg) -> metrics`` is the plain entry point (DVC stage ``train_clip``, tests), with ``cfg``
a ``TrainClipConfig``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from budgetdiff.domain.evaluators import build_domain_clip, domain_clip_model_cfg, save_domain_clip
from budgetdiff.domain import scenes
from budgetdiff.domain.scenes import parse_prompt, render_scene_array, sample_scene, spec_to_prompt
from mlops.params import config_dict
from training.batches import stack_columns
from training.trainer import make_trainer, warmup_cosine_scheduler

HELD_OUT_SEED_OFFSET = 30_000_000  # evaluation scenes: a seed range no training stream reaches


@dataclass(frozen=True)
class VisionTower:
    """``train_clip.vision``: the ViT image tower."""

    width: int
    layers: int
    patch_size: int
    head_width: int


@dataclass(frozen=True)
class TextTower:
    """``train_clip.text``: the text transformer."""

    width: int
    layers: int
    heads: int
    context_length: int


@dataclass(frozen=True)
class TrainClipConfig:
    """params.yaml's ``train_clip`` section."""

    seed: int
    resolution: int
    embed_dim: int
    vision: VisionTower
    text: TextTower
    count_weights: list[float]
    noise_aug: float
    batch_size: int
    max_steps: int
    lr: float
    weight_decay: float
    warmup_fraction: float
    grad_clip: float
    val_every: int  # 0: no retrieval checks during training
    eval_scenes: int
    output_dir: str
    metrics_path: str


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> the domain CLIP's input normalisation (mean 0.5, std 0.5)."""
    return images * 2.0 - 1.0


class PromptedSceneStream(IterableDataset):
    """Endless stream of (image (3, R, R) in [0, 1], prompt) rendered from random seeds.

    Args:
        seed: stream seed. resolution: image side. count_weights: probabilities of 1..4 objects.
    """

    def __init__(self, seed: int, resolution: int, count_weights: list[float]):
        self.seed, self.resolution, self.count_weights = seed, resolution, tuple(count_weights)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1000 + (info.id if info else 0))
        while True:
            s = rng.randrange(HELD_OUT_SEED_OFFSET)
            spec = sample_scene(s, count_weights=self.count_weights)
            image = torch.from_numpy(render_scene_array(spec, self.resolution).copy()).permute(2, 0, 1).float() / 255.0
            yield image, spec_to_prompt(spec, seed=rng.randrange(1 << 30))


def held_out_scenes(n: int, resolution: int, count_weights: list[float], offset: int = HELD_OUT_SEED_OFFSET):
    """``n`` fixed held-out scenes: (specs, images (n, 3, R, R) in [0, 1], prompts)."""
    specs, prompts = scenes.held_out_scenes(n, offset, count_weights=count_weights)
    images = torch.from_numpy(np.stack([render_scene_array(s, resolution) for s in specs])).permute(0, 3, 1, 2)
    return specs, images.float() / 255.0, prompts


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, specs, images: torch.Tensor, prompts: list[str],
                       batch_size: int = 256) -> dict[str, float]:
    """Image-to-text top-1 retrieval accuracy among all ``prompts`` (one per image), overall and
    per object count; a hit is a retrieved prompt whose canonical scene equals the image's."""
    model.eval()
    device = next(model.parameters()).device
    img = torch.cat([model.encode_image(clip_pixels(images[i : i + batch_size]).to(device), normalize=True)
                     for i in range(0, len(prompts), batch_size)])
    txt = torch.cat([model.encode_text(tokenizer(prompts[i : i + batch_size]).to(device), normalize=True)
                     for i in range(0, len(prompts), batch_size)])
    best = (img @ txt.T).argmax(1).cpu().tolist()
    canon = [s.canonical() for s in specs]
    parsed = [parse_prompt(p) for p in prompts]
    hits = np.array([parsed[j] == canon[i] for i, j in enumerate(best)], dtype=float)
    counts = np.array([s.complexity for s in specs])
    out = {"image_to_text_top1": float(hits.mean())}
    for k in sorted(set(counts.tolist())):
        out[f"image_to_text_top1_{k}obj"] = float(hits[counts == k].mean())
    return out


class DomainClipModule(L.LightningModule):
    """Trains the domain CLIP with open_clip's ClipLoss."""

    def __init__(self, cfg: TrainClipConfig):
        super().__init__()
        self.save_hyperparameters({"cfg": config_dict(cfg)})
        self.cfg = cfg
        # budgetdiff's builder reads the section as plain data (resolution, embed_dim, vision, text)
        self.model, self.tokenizer = build_domain_clip(config_dict(cfg), seed=cfg.seed)
        from open_clip import ClipLoss

        self.loss_fn = ClipLoss()
        self._eval_set = None

    def model_step(self, batch) -> torch.Tensor:
        images, prompts = batch
        if self.training and self.cfg.noise_aug > 0:
            sigma = torch.rand(images.shape[0], 1, 1, 1, device=images.device) * self.cfg.noise_aug
            keep = torch.rand_like(sigma) < 0.5
            images = (images + torch.randn_like(images) * sigma * keep).clamp(0, 1)
        tokens = self.tokenizer(prompts).to(self.device)
        image_features, text_features, logit_scale = self.model(clip_pixels(images), tokens)
        return self.loss_fn(image_features, text_features, logit_scale)

    def training_step(self, batch, batch_idx):
        loss = self.model_step(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/logit_scale", self.model.logit_scale.exp().detach(), on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # Clamp the temperature as CLIP does (logit scale at most 100).
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        every = self.cfg.val_every
        if every and (self.global_step % every == 0):
            self.log_dict({f"val/{k}": v for k, v in self.evaluate().items()}, on_step=True, on_epoch=False)
            self.model.train()

    def evaluate(self) -> dict[str, float]:
        cfg = self.cfg
        if self._eval_set is None:
            self._eval_set = held_out_scenes(cfg.eval_scenes, cfg.resolution, cfg.count_weights)
        return retrieval_accuracy(self.model, self.tokenizer, *self._eval_set)

    def configure_optimizers(self):
        cfg = self.cfg
        opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, int(cfg.warmup_fraction * cfg.max_steps))
        return {"optimizer": opt, "lr_scheduler": warmup_cosine_scheduler(opt, cfg.max_steps, warmup)}


def train(cfg: TrainClipConfig) -> dict[str, Any]:
    """Train the domain CLIP per ``cfg`` (the ``train_clip`` params section), save it to
    ``cfg.output_dir`` (open_clip local-dir format) and return its held-out metrics."""
    from mlops.tracking import mlflow_logger

    L.seed_everything(cfg.seed, workers=True)
    module = DomainClipModule(cfg)
    loader = DataLoader(PromptedSceneStream(cfg.seed, cfg.resolution, cfg.count_weights),
                        batch_size=cfg.batch_size, collate_fn=stack_columns, num_workers=0)
    logger = mlflow_logger("train_clip", run_name="train_clip")
    trainer = make_trainer(logger, max_steps=cfg.max_steps, log_every_n_steps=max(1, min(10, cfg.max_steps // 2)),
                           gradient_clip_val=cfg.grad_clip, limit_val_batches=0)
    t0 = time.time()
    trainer.fit(module, loader)
    train_seconds = time.time() - t0

    retrieval = module.evaluate()
    model_cfg = domain_clip_model_cfg(config_dict(cfg))
    save_domain_clip(module.model.cpu(), model_cfg, cfg.output_dir,
                     extra={"budgetdiff": {"name": "domainclip", "stage": "train_clip", "steps": int(trainer.global_step)}})
    metrics = {
        "steps": int(trainer.global_step),
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / max(1, trainer.global_step), 4),
        "parameters": sum(p.numel() for p in module.model.parameters()),
        "eval_scenes": cfg.eval_scenes,
        **{f"held_out/{k}": v for k, v in retrieval.items()},
        "final_train_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
    }
    logger.log_metrics({k: v for k, v in metrics.items() if k.startswith("held_out/")})
    logger.experiment.log_dict(logger.run_id, metrics, "train_clip_metrics.json")
    return metrics


def main() -> None:
    from budgetdiff.io import atomic_write_json as write_json
    from mlops.params import load_config

    cfg = load_config("train_clip", TrainClipConfig)
    metrics = train(cfg)
    write_json(cfg.metrics_path, metrics)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
