"""Train the embedded base model: a pixel-space text-to-image UNet on the procedural scenes.

Recipe (see the foundation issue for the probes behind it):
- UNet2DConditionModel at 32x32, v-prediction, cosine noise schedule; cross-attention on the
  MiniLM token embeddings at 16x16 and 8x8, and the pooled sentence embedding added to the
  timestep embedding (``class_embed_type="projection"``); two coordinate input channels.
- Loss: min-SNR-γ weighting (Hang et al. 2023, eq. 8, v-prediction form min(SNR, γ)/(SNR + 1))
  times a per-pixel weight 1 + λ·object_mask, so the few object pixels are not drowned by the
  background.
- Caption dropout for classifier-free guidance; EMA of the weights is what gets saved.
- Scenes are rendered on the fly (0.2 ms each), so the data never repeats.

Two DVC stages use it:
- ``train_base`` trains from scratch (``python -m training.base``) and writes models/base_pretrain;
- ``finetune_base`` (``python -m training.base finetune_base``) starts from that model's EMA
  weights (``init_from``) and trains on at a low learning rate, which is what fixed object
  positions (see params.yaml); it writes models/base, the model every other stage uses.

``train(cfg) -> metrics`` is the plain entry point (DVC stages, tests), with ``cfg`` a
``TrainBaseConfig`` (``stage_config(stage)`` reads it from params.yaml); training resumes from its
last checkpoint after an interruption.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch.utils.data import DataLoader, IterableDataset

from budgetdiff.domain.evaluators import check_scene_heuristic, summarize_checks
from budgetdiff.io.fingerprint import content_sha256
from budgetdiff.generation.pipeline import BudgetDiffusionPipeline, coordinate_channels
from budgetdiff.domain.scenes import held_out_scenes, render_scene_array, sample_scene, spec_to_prompt
from budgetdiff.text import encode_prompts, load_minilm
from mlops.cli import UsageError, command
from mlops.params import config_dict
from training.batches import stack_columns
from training.trainer import make_trainer, warmup_cosine_scheduler

COORD_CHANNELS = 2
VAL_SEED_OFFSET = 10_000_000  # validation scenes never collide with training seeds


# ------------------------------------------------------------------------------------------------
# The config: params.yaml's train_base section (finetune_base, train_base_v2: with their overrides)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UNetConfig:
    """``train_base.unet``: a diffusers ``UNet2DConditionModel``."""

    block_out_channels: list[int]
    cross_attention_levels: list[bool]  # one flag per level (len = len(block_out_channels))
    layers_per_block: int
    attention_head_dim: int
    norm_num_groups: int
    text_dim: int
    # Add the pooled sentence embedding to the timestep embedding (class_embed_type="projection").
    pooled_text: bool = True


@dataclass(frozen=True)
class CompositionValidation:
    """``val_composition``: version 2's validation (``composition_and_detail``)."""

    counts: list[int]
    prompts_per_count: int  # plain prompts per object count
    checker: str
    detail_prompts: int
    detail_short_steps: int


@dataclass(frozen=True)
class TrainBaseConfig:
    """params.yaml's ``train_base`` section; ``finetune_base`` and ``train_base_v2`` are it with
    their own section's overrides (``stage_config``)."""

    seed: int
    resolution: int
    unet: UNetConfig
    num_train_timesteps: int
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
    count_weights: list[float]
    batch_size: int
    max_steps: int
    lr: float
    lr_decay_start: float
    weight_decay: float
    grad_clip: float
    caption_dropout: float
    min_snr_gamma: float
    object_loss_weight: float
    ema_decay: float
    val_every: int  # 0: no validation during training
    val_prompts: int
    val_steps: int
    val_guidance: float
    guidance_candidates: list[float]
    guidance_eval_prompts: int
    checkpoint_every: int
    checkpoint_dir: str
    output_dir: str
    metrics_path: str
    init_from: Optional[str] = None
    lr_warmup_steps: int = 0
    material_prob: float = 0.0
    speckle_prob: float = 0.0
    guidance_eval_steps: Optional[int] = None  # None: val_steps
    guidance_checker: Optional[str] = None
    guidance_eval_objects: Optional[int] = 1
    val_composition: Optional[CompositionValidation] = None
    curve_path: Optional[str] = None
    stage: str = "train_base"  # the DVC stage (MLflow run name): set by stage_config, not a params.yaml key


STAGES = ("train_base", "finetune_base", "train_base_v2")


def stage_config(stage: str, path: str | os.PathLike | None = None) -> TrainBaseConfig:
    """``train_base`` as is; ``finetune_base`` and ``train_base_v2`` are ``train_base`` with their
    own section's overrides. ``path``: the params file (default: ``BUDGETDIFF_PARAMS`` or params.yaml)."""
    from mlops.params import load_config

    if stage not in STAGES:
        raise UsageError(f"unknown stage {stage!r} ({', '.join(STAGES)})")
    overrides = () if stage == "train_base" else (stage,)
    return dataclasses.replace(load_config("train_base", TrainBaseConfig, path, overrides=overrides), stage=stage)


# ------------------------------------------------------------------------------------------------
# Model, noise schedule, data
# ------------------------------------------------------------------------------------------------
def build_unet(unet: UNetConfig, resolution: int) -> UNet2DConditionModel:
    """The base model's UNet for ``resolution``-pixel images. ``unet.pooled_text`` adds the pooled
    sentence embedding to the timestep embedding; without it the prompt reaches the UNet through
    cross-attention alone (the pooled vector, added at every pixel, holds every object's
    attributes unbound, a path for one object's colour to leak onto another)."""
    pooled = unet.pooled_text
    levels = unet.cross_attention_levels
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels))
    return UNet2DConditionModel(
        sample_size=resolution,
        in_channels=3 + COORD_CHANNELS,
        out_channels=3,
        block_out_channels=tuple(unet.block_out_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=unet.layers_per_block,
        cross_attention_dim=unet.text_dim,
        attention_head_dim=unet.attention_head_dim,
        norm_num_groups=unet.norm_num_groups,
        class_embed_type="projection" if pooled else None,
        projection_class_embeddings_input_dim=unet.text_dim if pooled else None,
    )


def build_noise_scheduler(cfg: TrainBaseConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type="v_prediction",
        clip_sample=True,
    )


class SceneStream(IterableDataset):
    """Endless stream of (image in [-1, 1], object mask, prompt) rendered from seeds. With
    ``material_prob`` / ``speckle_prob`` above 0 the scenes carry version-2 random detail (the
    same scenes otherwise, so at 0 the stream is version 1's)."""

    def __init__(self, seed: int, resolution: int, count_weights: list[float], material_prob: float = 0.0,
                 speckle_prob: float = 0.0):
        self.seed, self.resolution, self.count_weights = seed, resolution, tuple(count_weights)
        self.material_prob, self.speckle_prob = float(material_prob), float(speckle_prob)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rng = random.Random(self.seed * 1000 + worker)
        while True:
            s = rng.randrange(VAL_SEED_OFFSET)
            spec = sample_scene(s, count_weights=self.count_weights, material_prob=self.material_prob,
                                speckle_prob=self.speckle_prob)
            image, mask = render_scene_array(spec, self.resolution, with_mask=True)
            x = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0
            yield x, torch.from_numpy(mask)[None], spec_to_prompt(spec, seed=s)


def validation_scenes(n: int, n_objects: int | None = 1, offset: int = VAL_SEED_OFFSET):
    """The validation scenes (``held_out_scenes`` from ``VAL_SEED_OFFSET``, 1 object by default)."""
    return held_out_scenes(n, offset, n_objects=n_objects)


def evaluate_pipeline(pipe, specs, prompts, steps: int, guidance: float, batch_size: int = 64,
                      checker=None) -> dict:
    """Accuracies of ``pipe``'s images for ``prompts`` against ``specs``: judged by the trained
    attribute checker when ``checker`` is given, else by the heuristic checker."""
    images = pipe.generate_in_batches(prompts, batch_size, seed=0, output_type="np", num_inference_steps=steps,
                                      guidance_scale=guidance, scheduler="ddim").images
    if checker is not None:
        from budgetdiff.domain.evaluators import attr_check

        return attr_check(images, specs, checker=checker)
    return summarize_checks([check_scene_heuristic(img, spec) for img, spec in zip(images, specs)])


@torch.no_grad()
def composition_and_detail(pipe, vcfg: CompositionValidation, steps: int, guidance: float) -> dict:
    """Validation of what version 2 asks for: the share of plain (version-1) prompts with every
    attribute right per object count of ``vcfg.counts`` (judged by the trained attribute checker
    at ``vcfg.checker``), and the mean ``detail/score`` on detailed prompts at ``steps`` and at
    ``vcfg.detail_short_steps`` (the gap that makes steps matter)."""
    from budgetdiff.domain.detail import detail_scores, expected_region_sd
    from budgetdiff.domain.evaluators import attr_check, load_attribute_checker

    checker = load_attribute_checker(vcfg.checker)
    n = vcfg.prompts_per_count
    out = {}
    for k in vcfg.counts:
        specs, prompts = held_out_scenes(n, VAL_SEED_OFFSET + 200_000 + 10_000 * int(k), n_objects=int(k))
        images = pipe.generate_in_batches(prompts, 64, seed=0, output_type="np", num_inference_steps=steps,
                                          guidance_scale=guidance, scheduler="ddim").images
        out[f"all_attributes_{k}obj"] = attr_check(images, specs, checker=checker)["all_attributes"]
    specs = [sample_scene(VAL_SEED_OFFSET + 300_000 + i, material_prob=1.0, speckle_prob=0.3)
             for i in range(vcfg.detail_prompts)]
    prompts = [spec_to_prompt(s) for s in specs]
    expected = [expected_region_sd(s) for s in specs]
    for n_steps, name in ((steps, "detail_score"), (vcfg.detail_short_steps, "detail_score_short")):
        images = pipe.generate_in_batches(prompts, 64, seed=0, output_type="np", num_inference_steps=n_steps,
                                          guidance_scale=guidance, scheduler="ddim").images
        scores = [detail_scores(im, s, e)["detail/score"] for im, s, e in zip(images, specs, expected)]
        out[name] = float(np.nanmean(scores))
    return out


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, max_decay: float) -> None:
    """EMA of ``model``'s weights into ``ema``, with warm-up: the decay grows as
    (1 + step) / (10 + step) up to ``max_decay``."""
    decay = min(max_decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


class BaseDiffusionModule(L.LightningModule):
    """Trains the base UNet (the text encoder stays frozen); keeps an EMA copy for sampling."""

    def __init__(self, cfg: TrainBaseConfig):
        super().__init__()
        self.save_hyperparameters({"cfg": config_dict(cfg)})
        self.cfg = cfg
        self.unet = build_unet(cfg.unet, cfg.resolution)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.noise_scheduler = build_noise_scheduler(cfg)
        encoder, tokenizer = load_minilm()
        self.text_encoder = encoder  # frozen; excluded from the checkpoint below
        self.tokenizer = tokenizer
        alphas = self.noise_scheduler.alphas_cumprod
        self.register_buffer("snr", alphas / (1 - alphas), persistent=False)

    # Frozen encoder weights ship with the package: keep them out of checkpoints.
    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        return {k: v for k, v in sd.items() if not k.startswith("text_encoder.")}

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        return super().load_state_dict(state_dict, strict=False, **kwargs)

    def model_step(self, batch) -> torch.Tensor:
        x0, mask, prompts = batch
        cfg = self.cfg
        prompts = ["" if random.random() < cfg.caption_dropout else p for p in prompts]
        emb = encode_prompts(prompts, self.text_encoder, self.tokenizer, device=self.device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, cfg.num_train_timesteps, (x0.shape[0],), device=self.device)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        target = self.noise_scheduler.get_velocity(x0, noise, t)
        coords = coordinate_channels(x0.shape[0], *x0.shape[-2:], x0.device, x0.dtype)
        pred = self.unet(torch.cat([x_t, coords], 1), t, encoder_hidden_states=emb.hidden,
                         encoder_attention_mask=emb.mask, class_labels=emb.pooled).sample
        snr = self.snr.to(self.device)[t]
        weight = torch.clamp(snr, max=cfg.min_snr_gamma) / (snr + 1)  # min-SNR for v-prediction
        pixel_weight = 1.0 + cfg.object_loss_weight * mask
        per_sample = ((pred - target) ** 2 * pixel_weight).mean(dim=(1, 2, 3)) / pixel_weight.mean(dim=(1, 2, 3))
        return (weight * per_sample).mean()

    def training_step(self, batch, batch_idx):
        loss = self.model_step(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        n = self.global_step
        update_ema(self.ema_unet, self.unet, n, self.cfg.ema_decay)
        every = self.cfg.val_every
        if every and (n + 1) % every == 0:
            self.run_validation()

    def sampling_pipeline(self, guidance: float) -> BudgetDiffusionPipeline:
        sched = DDIMScheduler.from_config(self.noise_scheduler.config)
        pipe = BudgetDiffusionPipeline(self.ema_unet, self.text_encoder, self.tokenizer, sched,
                                       default_guidance_scale=guidance)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def run_validation(self) -> None:
        cfg = self.cfg
        specs, prompts = validation_scenes(cfg.val_prompts)
        g = cfg.val_guidance
        pipe = self.sampling_pipeline(g)
        metrics = evaluate_pipeline(pipe, specs, prompts, cfg.val_steps, g)
        if cfg.val_composition:
            metrics.update(composition_and_detail(pipe, cfg.val_composition, cfg.val_steps, g))
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, on_step=True, on_epoch=False)
        print(f"\n[val step {self.global_step + 1}] " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()), flush=True)
        if cfg.curve_path:  # the quality-vs-training-compute curve, one line per validation
            from budgetdiff.io import append_jsonl

            append_jsonl(cfg.curve_path, {"step": self.global_step + 1,
                                          "images_seen": (self.global_step + 1) * cfg.batch_size,
                                          "config": config_hash(cfg), **metrics})

    def configure_optimizers(self):
        cfg = self.cfg
        opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # hold, then cosine decay; a linear warm-up on top (a fine-tune starts with a fresh optimizer)
        sched = warmup_cosine_scheduler(opt, cfg.max_steps, cfg.lr_warmup_steps,
                                        decay_start=int(cfg.lr_decay_start * cfg.max_steps))
        return {"optimizer": opt, "lr_scheduler": sched}


# Keys that only affect what happens after training (the guidance choice, where results go):
# a checkpoint stays valid when they change.
POST_TRAINING_KEYS = frozenset({"stage", "output_dir", "metrics_path", "guidance_candidates",
                                "guidance_eval_prompts", "guidance_eval_steps", "guidance_checker",
                                "guidance_eval_objects", "curve_path", "val_composition"})


def config_hash(cfg: TrainBaseConfig) -> str:
    """Key of a run's checkpoints: the training-relevant part of its config, as the params
    sections state it (``config_dict(..., omit_defaults=True)``: a field left at its default is not in the key, so a
    section hashes as it did when stages read it as a dict; tests pin train_base_v2's key)."""
    return content_sha256({k: v for k, v in config_dict(cfg, omit_defaults=True).items() if k not in POST_TRAINING_KEYS}, 12)


def choose_guidance(module, candidates: list[float], n_prompts: int, steps: int, checker_dir: str | None = None,
                    n_objects: int | None = 1) -> tuple[float, dict]:
    """Pick the default guidance by measurement: the candidate with the best mean of colour,
    shape and position accuracy on ``n_prompts`` held-out prompts of ``n_objects`` objects (None:
    drawn as the training mix does; a seed range of its own), at ``steps`` DDIM steps, judged by
    the trained attribute checker at ``checker_dir`` when set (else the heuristic checker).
    ``module``: anything with ``sampling_pipeline(guidance)`` (the base model, a student)."""
    specs, prompts = validation_scenes(n_prompts, n_objects=n_objects, offset=VAL_SEED_OFFSET + 500_000)
    checker = None
    if checker_dir:
        from budgetdiff.domain.evaluators import load_attribute_checker

        checker = load_attribute_checker(checker_dir)
    results = {}
    for g in candidates:
        m = evaluate_pipeline(module.sampling_pipeline(g), specs, prompts, steps, g, checker=checker)
        results[str(g)] = m
        print(f"[guidance {g}, {steps} steps] " + " ".join(f"{k}={v:.3f}" for k, v in m.items()), flush=True)
    score = {g: np.mean([m["color"], m["shape"], m["position"]]) for g, m in results.items()}
    best = max(score, key=score.get)
    return float(best), results


def init_weights(module: BaseDiffusionModule, model_dir: str | os.PathLike) -> None:
    """Start both the trained and the EMA UNet from a saved pipeline's UNet (its EMA weights)."""
    unet_dir = Path(model_dir) / "unet"
    if not unet_dir.is_dir():
        raise ValueError(f"init_from {model_dir}: no unet/ directory (train the earlier stage first)")
    saved = UNet2DConditionModel.from_pretrained(unet_dir)
    expected = dict(build_unet(module.cfg.unet, module.cfg.resolution).config)
    mismatched = [k for k in ("block_out_channels", "down_block_types", "cross_attention_dim", "in_channels")
                  if tuple(np.atleast_1d(saved.config[k])) != tuple(np.atleast_1d(expected[k]))]
    if mismatched:
        raise ValueError(f"init_from {model_dir}: its UNet differs from the config in {', '.join(mismatched)}")
    state = saved.state_dict()
    if module.unet.class_embedding is None:  # the new UNet drops the pooled-text path
        state = {k: v for k, v in state.items() if not k.startswith("class_embedding.")}
    module.unet.load_state_dict(state)
    module.ema_unet.load_state_dict(state)


def train(cfg: TrainBaseConfig) -> dict[str, Any]:
    """Train the base model per ``cfg`` (``stage_config``: the ``train_base`` section of params.yaml
    with a stage's overrides) and save it as a diffusers pipeline directory at ``cfg.output_dir``.
    Returns the final metrics."""
    from mlops.tracking import mlflow_logger

    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    ckpt_dir = Path(cfg.checkpoint_dir) / config_hash(cfg)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last = ckpt_dir / "last.ckpt"

    module = BaseDiffusionModule(cfg)
    if cfg.init_from:
        init_weights(module, cfg.init_from)
    loader = DataLoader(SceneStream(cfg.seed, cfg.resolution, cfg.count_weights, cfg.material_prob, cfg.speckle_prob),
                        batch_size=cfg.batch_size, collate_fn=stack_columns, num_workers=0)
    logger = mlflow_logger(cfg.stage, run_name=cfg.stage)
    trainer = make_trainer(logger, checkpoint_dir=ckpt_dir, checkpoint_every=cfg.checkpoint_every,
                           max_steps=cfg.max_steps, log_every_n_steps=10, gradient_clip_val=cfg.grad_clip,
                           limit_val_batches=0)
    t0 = time.time()
    trainer.fit(module, loader, ckpt_path=str(last) if last.exists() else None)
    train_seconds = time.time() - t0

    module.eval()
    eval_steps = cfg.guidance_eval_steps if cfg.guidance_eval_steps is not None else cfg.val_steps
    guidance, guidance_results = choose_guidance(module, cfg.guidance_candidates, cfg.guidance_eval_prompts,
                                                 eval_steps, cfg.guidance_checker, cfg.guidance_eval_objects)
    pipe = module.sampling_pipeline(guidance)
    out_dir = Path(cfg.output_dir)
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    if tmp_dir.exists():
        import shutil

        shutil.rmtree(tmp_dir)
    pipe.save_pretrained(tmp_dir, safe_serialization=True)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)

    metrics = {
        "steps": int(trainer.global_step),
        "train_seconds_this_run": round(train_seconds, 1),
        "unet_parameters": sum(p.numel() for p in module.unet.parameters()),
        "default_guidance": guidance,
        "guidance_sweep": guidance_results,
        "guidance_eval": {"steps": eval_steps, "prompts": cfg.guidance_eval_prompts,
                          "checker": cfg.guidance_checker or "heuristic_v1"},
        "final_train_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        "init_from": cfg.init_from,
    }
    if logger is not None:
        logger.log_metrics({"final/default_guidance": guidance})
        logger.experiment.log_dict(logger.run_id, metrics, "train_base_metrics.json")
    return metrics


@command
def main() -> None:
    import sys

    from budgetdiff.io import atomic_write_json as write_json

    cfg = stage_config(sys.argv[1] if len(sys.argv) > 1 else "train_base")
    metrics = train(cfg)
    write_json(cfg.metrics_path, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "guidance_sweep"}))


if __name__ == "__main__":
    main()
