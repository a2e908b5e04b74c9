"""SnapFusion step distillation with the CFG-aware loss (Li et al. 2023, arXiv 2306.00980, sec. 4).

A frozen teacher (the embedded v-prediction model, or an earlier student) takes two DDIM steps
t -> t' -> t''; the student, a copy of the teacher's UNet, learns to take them in one, t -> t''.

Notation (the paper's): z_t = α_t·x + σ_t·ε with α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t), ᾱ from
the model's own ``DDIMScheduler`` (``alphas_cumprod``; ᾱ = 1 past the last step, as
``set_alpha_to_one`` says). A v-prediction gives x̂ = α_t·z_t − σ_t·v̂ and ε̂ = σ_t·z_t + α_t·v̂,
and a DDIM step (η = 0) is z_s = α_s·x̂ + σ_s·ε̂ (x̂ clipped to [-1, 1] when the scheduler's
``clip_sample`` says so, exactly as ``DDIMScheduler.step`` does at inference).

- Vanilla step distillation (Eqs. 7-9): the teacher's two DDIM steps give z_t''; the student's x̂
  is regressed onto the x that one DDIM step from z_t must predict to land there,
      x = (z_t'' − (σ_t''/σ_t)·z_t) / (α_t'' − (σ_t''/σ_t)·α_t),                  (Eq. 8)
  with the truncated-SNR weight max(α_t²/σ_t², 1)                                   (Eq. 9).
  The caption is dropped with probability ``caption_dropout`` (as in the teacher's training), so
  the unconditional branch that classifier-free guidance needs at inference is distilled too.
- CFG-aware distillation (Eq. 10): teacher and student outputs are both replaced by their guided
  versions ṽ = w·v(c) − (w − 1)·v(∅) with the same w ~ U[w_min, w_max] per sample, before the
  DDIM steps. The student is not conditioned on w; inference still uses CFG.
- Loss mixing (Eq. 11): L = L_dstl + γ·L̃_ori. L_dstl is the CFG loss with probability ``p_cfg``
  (one draw per training step, a pure function of the step so a resumed run draws the same) and
  the vanilla loss otherwise. L_ori is the teacher's own denoising loss on the rendered scene
  (v-prediction, min-SNR-5 weight, object-mask pixel weight, caption dropout). The paper gives
  no formula for rescaling it to L_dstl's magnitude; here
      L̃_ori = L_ori · sg(L_dstl / L_ori),
  so L̃_ori has L_dstl's value (the logged ``train/loss`` is (1 + γ)·L_dstl) while its gradient
  is L_ori's, scaled by the current ratio: γ sets the share of the gradient, whatever the two
  losses' units.

Timestep grids, kept consistent with inference (``BudgetDiffusionPipeline`` runs DDIM with
``timestep_spacing="trailing"``): a student of N steps is trained at the N timesteps of that
grid, t_i = round(1000 − i·1000/N) − 1 (999, 874, ..., 124 for N = 8), and lands, as
``DDIMScheduler.step`` does, at t'' = t − 1000 // N (−1 = the clean image after the last step).
The teacher's midpoint t' is the timestep of its own 2N-step trailing grid between them (937 for
t = 999, N = 8); the 2N grid's even entries are exactly the N grid. So "32 -> 16, then 16 -> 8"
is ``student_steps: 16`` from models/base, then ``student_steps: 8`` from models/student-16; the
default workflow's 8-step students take the base model at 16 steps as their teacher instead
(params.yaml says why: the 16-step student is measurably worse than the base at 16 steps).

``train(cfg) -> metrics`` is the plain entry point (DVC stages, tests); ``python -m
training.distill distill_16`` or ``python -m training.distill distill_8 VARIANT`` runs a stage of
params.yaml. Training resumes from its last checkpoint under ``checkpoint_dir`` (keyed by the hash
of the config and the teacher's weights).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from torch.utils.data import DataLoader

# Importing budgetdiff.generation.pipeline registers BudgetDiffusionPipeline with diffusers (from_pretrained).
from budgetdiff.generation.pipeline import BudgetDiffusionPipeline, coordinate_channels
from budgetdiff.io.fingerprint import content_sha256, directory_fingerprint, unet_fingerprint
from budgetdiff.text import PromptEmbeddings, encode_prompts
from mlops.cli import UsageError, command
from mlops.params import config_dict
from training.base import (SceneStream, choose_guidance, evaluate_pipeline, update_ema,
                           validation_scenes)
from training.batches import stack_columns
from training.trainer import make_trainer, warmup_cosine_scheduler

DISTILLATION_FILE = "distillation.json"  # beside model_index.json: what the student was distilled from


@dataclass(frozen=True)
class DistillConfig:
    """A distillation run: params.yaml's ``distill`` section with a stage's section (``distill_16``,
    ``distill_8``) and, for ``distill_8``, a ``distill_8_variants`` entry over it (``stage_config``)."""

    seed: int
    count_weights: list[float]
    batch_size: int
    lr: float
    lr_warmup_steps: int
    weight_decay: float
    grad_clip: float
    ema_decay: float
    p_cfg: float
    guidance_range: tuple[float, float]
    gamma: float
    caption_dropout: float
    min_snr_gamma: float
    object_loss_weight: float
    val_every: int  # 0: no validation during training
    val_prompts: int
    heldout_loss_scenes: int  # 0: no held-out loss
    sweep_guidance: bool
    guidance_candidates: list[float]
    guidance_eval_prompts: int
    checkpoint_every: int
    checkpoint_dir: str
    teacher: str
    student_steps: int
    max_steps: int
    output_dir: str
    metrics_path: str
    guidance_eval_steps: Optional[int] = None  # the guidance sweep's DDIM steps; None: student_steps
    guidance_eval_objects: Optional[int] = 1  # the sweep prompts' object count; None: the training mix
    guidance_checker: Optional[str] = None  # the sweep's judge; None: the heuristic checker
    share_frozen_components: bool = True  # link the student's text encoder and tokenizer to the teacher's
    stage: str = "distill"  # the DVC stage (MLflow run name, part of the checkpoint key): set by stage_config


# ----------------------------------------------------------------------------------------------
# Schedules and the maths of one distillation target (plain functions, tested on their own)
# ----------------------------------------------------------------------------------------------
@dataclass
class StepGrid:
    """The student's timesteps ``t`` (N,), the teacher's midpoints ``t_mid`` and the landing
    timesteps ``t_next`` (−1: past the last step, the clean image)."""

    t: torch.Tensor
    t_mid: torch.Tensor
    t_next: torch.Tensor

    @property
    def student_steps(self) -> int:
        return int(self.t.numel())


def step_grid(scheduler_config, student_steps: int) -> StepGrid:
    """The N-step student grid and the teacher's 2N-step grid, both DDIM with trailing spacing
    (the inference pipeline's), from a scheduler config (num_train_timesteps)."""
    sched = DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing")
    sched.set_timesteps(student_steps)
    t = sched.timesteps.clone()
    sched.set_timesteps(2 * student_steps)
    teacher = sched.timesteps.clone()
    if not torch.equal(teacher[0::2], t):
        raise ValueError(f"student_steps={student_steps}: the 2N-step grid does not contain the N-step grid")
    t_next = t - sched.config.num_train_timesteps // student_steps  # what DDIMScheduler.step does
    t_mid = teacher[1::2]
    if not bool(((t_next < t_mid) & (t_mid < t)).all()):
        raise ValueError(f"student_steps={student_steps}: teacher midpoints are not between t and t''")
    return StepGrid(t=t, t_mid=t_mid, t_next=t_next)


class NoiseSchedule:
    """α_t and σ_t of a diffusers ``DDIMScheduler`` (its ``alphas_cumprod``); t = −1 means past
    the last step, where ᾱ is the scheduler's ``final_alpha_cumprod``."""

    def __init__(self, scheduler: DDIMScheduler):
        self.alphas_cumprod = scheduler.alphas_cumprod.double()
        self.final_alpha_cumprod = float(scheduler.final_alpha_cumprod)
        self.clip_sample = bool(scheduler.config.clip_sample) and not scheduler.config.thresholding
        self.clip_range = float(scheduler.config.clip_sample_range)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) shaped (B, 1, 1, 1) in ``like``'s dtype and device."""
        ac = self.alphas_cumprod.to(t.device)[t.clamp(min=0)]
        ac = torch.where(t >= 0, ac, torch.full_like(ac, self.final_alpha_cumprod))
        shape = (-1,) + (1,) * (like.ndim - 1)
        return ac.sqrt().to(like).view(shape), (1 - ac).sqrt().to(like).view(shape)

    def ddim_step(self, z: torch.Tensor, v: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                  clip: bool | None = None) -> torch.Tensor:
        """One deterministic DDIM step z_t -> z_s from a v-prediction (DDIM eq. 12, η = 0), as
        ``DDIMScheduler.step``: x̂ is clipped when ``clip`` (default: the scheduler's
        clip_sample), ε̂ is not."""
        a_t, s_t = self.alpha_sigma(t, z)
        a_s, s_s = self.alpha_sigma(s, z)
        x_hat = a_t * z - s_t * v
        eps_hat = s_t * z + a_t * v
        if self.clip_sample if clip is None else clip:
            x_hat = x_hat.clamp(-self.clip_range, self.clip_range)
        return a_s * x_hat + s_s * eps_hat


def distillation_target(z_t: torch.Tensor, z_next: torch.Tensor, alpha_t, sigma_t, alpha_next, sigma_next):
    """SnapFusion Eq. 8: the x̂ with which one DDIM step from z_t lands on z_t'',
    x = (z_t'' − (σ_t''/σ_t)·z_t) / (α_t'' − (σ_t''/σ_t)·α_t)."""
    ratio = sigma_next / sigma_t
    return (z_next - ratio * z_t) / (alpha_next - ratio * alpha_t)


def truncated_snr_weight(alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """SnapFusion Eq. 9 (Salimans & Ho 2022): max(α_t²/σ_t², 1)."""
    return torch.clamp(alpha_t**2 / sigma_t**2, min=1.0)


def guided(v_uncond: torch.Tensor, v_cond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """SnapFusion Eq. 10: ṽ = w·v(c) − (w − 1)·v(∅)."""
    return w * v_cond - (w - 1) * v_uncond


def uses_cfg_loss(seed: int, step: int, p_cfg: float) -> bool:
    """Whether training step ``step`` uses the CFG loss (probability ``p_cfg``, Eq. 11); a pure
    function of (seed, step), so a resumed run makes the same draws."""
    return random.Random(seed * 1_000_003 + step).random() < p_cfg


def velocity(unet, z: torch.Tensor, t: torch.Tensor, emb: PromptEmbeddings) -> torch.Tensor:
    """The UNet's v-prediction with the pipeline's coordinate channels concatenated to its input."""
    coords = coordinate_channels(z.shape[0], *z.shape[-2:], z.device, z.dtype)
    return unet(torch.cat([z, coords], 1), t, encoder_hidden_states=emb.hidden, encoder_attention_mask=emb.mask,
                class_labels=emb.pooled).sample


def guided_velocity(unet, z: torch.Tensor, t: torch.Tensor, pair: PromptEmbeddings, w: torch.Tensor) -> torch.Tensor:
    """ṽ (Eq. 10) from one batched call over [∅; c]; ``pair`` holds the B unconditional rows first,
    then the B conditional ones (as the pipeline batches them)."""
    v_uncond, v_cond = velocity(unet, torch.cat([z, z]), torch.cat([t, t]), pair).chunk(2)
    return guided(v_uncond, v_cond, w)


def _rows(emb: PromptEmbeddings, index) -> PromptEmbeddings:
    return PromptEmbeddings(emb.hidden[index], emb.mask[index], emb.pooled[index], [])


def _where(drop: torch.Tensor, uncond: PromptEmbeddings, cond: PromptEmbeddings) -> PromptEmbeddings:
    """Per sample: the unconditional embedding where ``drop``, else the conditional one."""
    row = drop[:, None]
    return PromptEmbeddings(torch.where(row[..., None], uncond.hidden, cond.hidden),
                            torch.where(row, uncond.mask, cond.mask), torch.where(row, uncond.pooled, cond.pooled), [])


# ----------------------------------------------------------------------------------------------
# The LightningModule
# ----------------------------------------------------------------------------------------------
def load_teacher(path: str | Path) -> BudgetDiffusionPipeline:
    """The teacher pipeline (``DiffusionPipeline.from_pretrained``, offline), fp32 on CPU."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ValueError(f"teacher {str(path)!r} is not a pipeline directory (run its DVC stage first)")
    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    if not isinstance(pipe, BudgetDiffusionPipeline):
        raise ValueError(f"teacher {str(path)!r} is a {type(pipe).__name__}, not a BudgetDiffusionPipeline")
    if pipe.scheduler.config.prediction_type != "v_prediction":
        raise ValueError(f"teacher {str(path)!r} is not a v-prediction model")
    return pipe


class DistillationModule(L.LightningModule):
    """Distils the teacher at ``cfg.teacher`` into a student of ``cfg.student_steps`` steps.

    The teacher UNet and the text encoder are frozen and kept out of checkpoints; the student
    starts as a copy of the teacher's UNet and an EMA of it is what gets saved.
    """

    def __init__(self, cfg: DistillConfig):
        super().__init__()
        self.save_hyperparameters({"cfg": config_dict(cfg)})
        self.cfg = cfg
        teacher = load_teacher(cfg.teacher)
        self.teacher_unet = teacher.unet.requires_grad_(False).eval()
        self.text_encoder = teacher.text_encoder.requires_grad_(False).eval()
        self.tokenizer = teacher.tokenizer
        self.teacher_guidance = float(teacher.config.default_guidance_scale)
        self.max_text_length = int(teacher.config.max_text_length)
        self.scheduler = DDIMScheduler.from_config(teacher.scheduler.config)
        self.schedule = NoiseSchedule(self.scheduler)
        self.grid = step_grid(self.scheduler.config, cfg.student_steps)
        self.unet = copy.deepcopy(self.teacher_unet).requires_grad_(True).train()
        self.ema_unet = copy.deepcopy(self.teacher_unet).requires_grad_(False)

    # Frozen weights come from the teacher directory: keep them out of checkpoints.
    _FROZEN = ("teacher_unet.", "text_encoder.")

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        return {k: v for k, v in sd.items() if not k.startswith(self._FROZEN)}

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        return super().load_state_dict(state_dict, strict=False, **kwargs)

    def train(self, mode: bool = True):
        """Lightning switches the whole module to train mode; the frozen parts stay in eval
        (the text encoder's dropout must not perturb the teacher's conditioning)."""
        super().train(mode)
        self.teacher_unet.eval()
        self.text_encoder.eval()
        self.ema_unet.eval()
        return self

    # -- the loss ---------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> PromptEmbeddings:
        """Embeddings of [∅]·B + prompts in one call (equal padding, so rows can be mixed)."""
        return encode_prompts([""] * len(prompts) + list(prompts), self.text_encoder, self.tokenizer,
                              max_length=self.max_text_length, device=self.device)

    def distillation_loss(self, x0: torch.Tensor, pair: PromptEmbeddings, use_cfg: bool,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """L_dstl (Eqs. 7-10) on a batch of clean images; returns (loss, per-sample w; 1 when vanilla)."""
        cfg, b = self.cfg, x0.shape[0]
        dev = x0.device
        idx = torch.randint(0, self.grid.student_steps, (b,), generator=generator).to(dev)
        t, t_mid, t_next = (g.to(dev)[idx] for g in (self.grid.t, self.grid.t_mid, self.grid.t_next))
        eps = torch.randn(x0.shape, generator=generator).to(x0)
        a_t, s_t = self.schedule.alpha_sigma(t, x0)
        z_t = a_t * x0 + s_t * eps
        uncond, cond = _rows(pair, slice(0, b)), _rows(pair, slice(b, 2 * b))

        if use_cfg:
            lo, hi = cfg.guidance_range
            w = (lo + (hi - lo) * torch.rand(b, generator=generator)).to(x0).view(-1, 1, 1, 1)

            def model(unet, z, tt):
                return guided_velocity(unet, z, tt, pair, w)
        else:
            w = torch.ones(b, 1, 1, 1, dtype=x0.dtype, device=dev)
            drop = (torch.rand(b, generator=generator) < cfg.caption_dropout).to(dev)
            emb = _where(drop, uncond, cond)

            def model(unet, z, tt):
                return velocity(unet, z, tt, emb)

        # Teacher: two DDIM steps t -> t' -> t'' (Eq. 7), with the same guidance as the student.
        with torch.no_grad():
            z_mid = self.schedule.ddim_step(z_t, model(self.teacher_unet, z_t, t), t, t_mid)
            z_next = self.schedule.ddim_step(z_mid, model(self.teacher_unet, z_mid, t_mid), t_mid, t_next)
            a_next, s_next = self.schedule.alpha_sigma(t_next, x0)
            target = distillation_target(z_t, z_next, a_t, s_t, a_next, s_next)

        # Student: one step t -> t''; its x̂ regressed onto the target (Eqs. 8-9).
        x_hat = a_t * z_t - s_t * model(self.unet, z_t, t)
        weight = truncated_snr_weight(a_t, s_t).view(-1)
        loss = (weight * ((x_hat - target) ** 2).mean(dim=(1, 2, 3))).mean()
        return loss, w.view(-1)

    def denoising_loss(self, x0: torch.Tensor, mask: torch.Tensor, pair: PromptEmbeddings,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """L_ori: the teacher's training loss (training/base.py) on the student: v-prediction at a
        uniform t, min-SNR-γ weight min(SNR, γ)/(SNR + 1), pixel weight 1 + λ·mask, caption dropout."""
        cfg, b = self.cfg, x0.shape[0]
        dev = x0.device
        drop = (torch.rand(b, generator=generator) < cfg.caption_dropout).to(dev)
        emb = _where(drop, _rows(pair, slice(0, b)), _rows(pair, slice(b, 2 * b)))
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator).to(dev)
        eps = torch.randn(x0.shape, generator=generator).to(x0)
        a_t, s_t = self.schedule.alpha_sigma(t, x0)
        pred = velocity(self.unet, a_t * x0 + s_t * eps, t, emb)
        target = a_t * eps - s_t * x0
        snr = (a_t**2 / s_t**2).view(-1)
        weight = torch.clamp(snr, max=cfg.min_snr_gamma) / (snr + 1)
        pixel_weight = 1.0 + cfg.object_loss_weight * mask
        per_sample = ((pred - target) ** 2 * pixel_weight).mean(dim=(1, 2, 3)) / pixel_weight.mean(dim=(1, 2, 3))
        return (weight * per_sample).mean()

    def model_step(self, batch, use_cfg: bool, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Eq. 11: L = L_dstl + γ·L_ori·sg(L_dstl / L_ori)."""
        x0, mask, prompts = batch
        pair = self.encode(prompts)
        l_dstl, w = self.distillation_loss(x0, pair, use_cfg, generator)
        gamma = self.cfg.gamma
        if gamma > 0:
            l_ori = self.denoising_loss(x0, mask, pair, generator)
            scale = (l_dstl / l_ori.clamp(min=1e-12)).detach()
            loss = l_dstl + gamma * l_ori * scale
        else:
            l_ori = torch.zeros((), device=x0.device)
            loss = l_dstl
        return {"loss": loss, "loss_dstl": l_dstl.detach(), "loss_ori": l_ori.detach(), "w": w}

    def training_step(self, batch, batch_idx):
        use_cfg = uses_cfg_loss(self.cfg.seed, self.global_step, self.cfg.p_cfg)
        out = self.model_step(batch, use_cfg)
        self.log("train/loss", out["loss"], prog_bar=True, on_step=True, on_epoch=False)
        kind = "cfg" if use_cfg else "vanilla"
        self.log(f"train/loss_dstl_{kind}", out["loss_dstl"], on_step=True, on_epoch=False)
        self.log("train/loss_ori", out["loss_ori"], on_step=True, on_epoch=False)
        self.log("train/cfg_step", float(use_cfg), on_step=True, on_epoch=False)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return out["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        n = self.global_step
        update_ema(self.ema_unet, self.unet, n, self.cfg.ema_decay)
        every = self.cfg.val_every
        if every and (n + 1) % every == 0:
            self.run_validation()

    # -- sampling ---------------------------------------------------------------------------
    def sampling_pipeline(self, guidance: float) -> BudgetDiffusionPipeline:
        """The EMA student as a pipeline (the teacher's scheduler, text encoder and tokenizer)."""
        pipe = BudgetDiffusionPipeline(self.ema_unet, self.text_encoder, self.tokenizer,
                                       DDIMScheduler.from_config(self.scheduler.config),
                                       default_guidance_scale=guidance, max_text_length=self.max_text_length)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def run_validation(self) -> None:
        cfg = self.cfg
        specs, prompts = validation_scenes(cfg.val_prompts)
        g = self.teacher_guidance
        metrics = evaluate_pipeline(self.sampling_pipeline(g), specs, prompts, cfg.student_steps, g)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, on_step=True, on_epoch=False)
        print(f"\n[val step {self.global_step + 1}, {cfg.student_steps} steps, guidance {g}] "
              + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()), flush=True)

    def configure_optimizers(self):
        cfg = self.cfg
        opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        return {"optimizer": opt,
                "lr_scheduler": warmup_cosine_scheduler(opt, cfg.max_steps, cfg.lr_warmup_steps)}


# ----------------------------------------------------------------------------------------------
# train(cfg)
# ----------------------------------------------------------------------------------------------
# Settings of what happens after the last optimizer step (the guidance sweep, the held-out loss,
# where the student and its report go): they do not change the trained weights, so they are not
# in the checkpoint key, and changing one resumes the finished checkpoint instead of retraining.
POST_TRAINING_KEYS = frozenset({"sweep_guidance", "guidance_candidates", "guidance_eval_prompts",
                                "guidance_eval_objects", "guidance_eval_steps", "guidance_checker",
                                "heldout_loss_scenes", "output_dir", "metrics_path", "share_frozen_components"})


def training_config(cfg: DistillConfig) -> dict[str, Any]:
    """The part of ``cfg`` that changes the trained weights, as the params sections state it
    (``config_dict(..., omit_defaults=True)``: a field left at its default is out, as when stages read a dict)."""
    return {k: v for k, v in config_dict(cfg, omit_defaults=True).items() if k not in POST_TRAINING_KEYS}


def config_hash(cfg: DistillConfig) -> str:
    """Key of a student run's checkpoints: its training config (``POST_TRAINING_KEYS`` left out)
    and its teacher's weights (a retrained teacher never resumes an old checkpoint)."""
    return content_sha256({**training_config(cfg), "teacher_fingerprint": unet_fingerprint(cfg.teacher)}, 12)


@torch.no_grad()
def heldout_distillation_loss(module: DistillationModule, unet, n: int) -> dict[str, float]:
    """L_dstl (vanilla and CFG) of ``unet`` as the student on ``n`` held-out scenes with fixed
    timesteps, noise and w: the teacher's own UNet gives the starting point, the EMA student the end."""
    import numpy as np

    from budgetdiff.domain.scenes import render_scene_array
    from training.base import VAL_SEED_OFFSET

    specs, prompts = validation_scenes(n, n_objects=None, offset=VAL_SEED_OFFSET + 700_000)
    res = int(module.teacher_unet.config.sample_size)
    x0 = torch.from_numpy(np.stack([render_scene_array(s, res) for s in specs])).permute(0, 3, 1, 2).float()
    x0 = (x0 / 127.5 - 1.0).to(module.device)
    pair = module.encode(prompts)
    trained = module.unet
    module.unet = unet
    try:
        losses = {kind: module.distillation_loss(x0, pair, kind == "cfg", torch.Generator().manual_seed(0))[0]
                  for kind in ("vanilla", "cfg")}
        return {kind: round(float(loss), 6) for kind, loss in losses.items()}
    finally:
        module.unet = trained


FROZEN_COMPONENTS = ("text_encoder", "tokenizer")  # never trained by distillation


def share_frozen_components(student_dir: str | Path, teacher_dir: str | Path,
                            components: tuple[str, ...] = FROZEN_COMPONENTS) -> list[str]:
    """Replace each frozen component folder of a saved student by a relative symbolic link to the
    teacher's copy (followed through the teacher's own links), when the two are byte-identical.

    Why: the students are kept with the repository, and the frozen MiniLM text encoder is 87 MB;
    four students would add 350 MB of identical weights. A link keeps each student a standard
    diffusers directory (``from_pretrained`` follows it) at the cost of a few bytes. A component
    that differs from the teacher's is left as a real folder. Returns the linked components."""
    student_dir, teacher_dir = Path(student_dir), Path(teacher_dir)
    linked = []
    for name in components:
        mine, theirs = student_dir / name, (teacher_dir / name).resolve()
        if not mine.is_dir() or mine.is_symlink() or not theirs.is_dir():
            continue
        if directory_fingerprint(mine) != directory_fingerprint(theirs):
            continue
        shutil.rmtree(mine)
        # Relative to the student's parent, so the link holds after the atomic rename of a sibling.
        mine.symlink_to(Path(os.path.relpath(theirs, student_dir.resolve())), target_is_directory=True)
        linked.append(name)
    return linked


def save_student(module: DistillationModule, out_dir: str | Path, guidance: float, record: dict,
                 teacher_dir: str | Path | None = None) -> None:
    """Save the EMA student as a diffusers pipeline directory plus ``distillation.json``,
    atomically (a sibling temporary folder, then a rename). With ``teacher_dir``, the frozen
    components become links to the teacher's (``share_frozen_components``)."""
    out_dir = Path(out_dir)
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    module.sampling_pipeline(guidance).save_pretrained(tmp_dir, safe_serialization=True)
    if teacher_dir is not None:
        record = {**record, "linked_to_teacher": share_frozen_components(tmp_dir, teacher_dir)}
    (tmp_dir / DISTILLATION_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)


def train(cfg: DistillConfig) -> dict[str, Any]:
    """Distil ``cfg.teacher`` into a ``cfg.student_steps``-step student and save it at
    ``cfg.output_dir`` (see ``stage_config`` for the params.yaml sections). Returns metrics."""
    from mlops.tracking import mlflow_logger

    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    ckpt_dir = Path(cfg.checkpoint_dir) / config_hash(cfg)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last = ckpt_dir / "last.ckpt"

    module = DistillationModule(cfg)
    resolution = int(module.teacher_unet.config.sample_size)
    loader = DataLoader(SceneStream(cfg.seed, resolution, cfg.count_weights),
                        batch_size=cfg.batch_size, collate_fn=stack_columns, num_workers=0)
    stage = cfg.stage
    logger = mlflow_logger(stage, run_name=stage)
    trainer = make_trainer(logger, checkpoint_dir=ckpt_dir, checkpoint_every=cfg.checkpoint_every,
                           max_steps=cfg.max_steps, log_every_n_steps=10, gradient_clip_val=cfg.grad_clip,
                           limit_val_batches=0)
    resumed_from = int(torch.load(last, map_location="cpu", weights_only=False)["global_step"]) if last.exists() else 0
    t0 = time.time()
    with warnings.catch_warnings():  # the frozen teacher, text encoder and EMA are in eval mode on purpose
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
        trainer.fit(module, loader, ckpt_path=str(last) if last.exists() else None)
    train_seconds = time.time() - t0
    steps_this_run = int(trainer.global_step) - resumed_from

    module.eval()
    n_heldout = cfg.heldout_loss_scenes
    heldout = {"teacher_copy": heldout_distillation_loss(module, module.teacher_unet, n_heldout),
               "student_ema": heldout_distillation_loss(module, module.ema_unet, n_heldout)} if n_heldout else {}
    print(f"[held-out L_dstl, {n_heldout} scenes] " + json.dumps(heldout), flush=True)
    # The student's default guidance is its teacher's: the guidance it is distilled to match, judged
    # at (bench_distill's target_guidance) and served at (the bundle's student.guidance). The sweep
    # over guidance_candidates is a diagnostic, recorded with its best candidate.
    guidance = module.teacher_guidance
    if cfg.sweep_guidance:
        steps = cfg.guidance_eval_steps if cfg.guidance_eval_steps is not None else cfg.student_steps
        sweep_best, guidance_results = choose_guidance(module, cfg.guidance_candidates, cfg.guidance_eval_prompts,
                                                       steps, cfg.guidance_checker, cfg.guidance_eval_objects)
    else:
        sweep_best, guidance_results = None, {}
    teacher_record = {}
    teacher_file = Path(cfg.teacher) / DISTILLATION_FILE
    if teacher_file.is_file():  # the teacher is itself a student: keep the chain
        teacher_record = json.loads(teacher_file.read_text())
    record = {
        "method": "SnapFusion step distillation, CFG-aware loss (arXiv 2306.00980, sec. 4)",
        "teacher": str(cfg.teacher),
        "teacher_fingerprint": unet_fingerprint(cfg.teacher),
        "teacher_steps": 2 * cfg.student_steps,
        "student_steps": cfg.student_steps,
        "timestep_spacing": "trailing",
        "training_steps": int(trainer.global_step),
        "batch_size": cfg.batch_size,
        "p_cfg": cfg.p_cfg,
        "guidance_range": list(cfg.guidance_range),
        "gamma": cfg.gamma,
        "lr": cfg.lr,
        "default_guidance": guidance,
        "sweep_best_guidance": sweep_best,
        "stage": stage,
        "teacher_distillation": teacher_record or None,
    }
    save_student(module, cfg.output_dir, guidance, record,
                 teacher_dir=cfg.teacher if cfg.share_frozen_components else None)

    metrics = {
        **{k: record[k] for k in ("teacher", "teacher_steps", "student_steps", "p_cfg", "guidance_range", "gamma")},
        "steps": int(trainer.global_step),
        "train_seconds_this_run": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / steps_this_run, 3) if steps_this_run else None,
        "default_guidance": guidance,
        "sweep_best_guidance": sweep_best,
        "guidance_sweep": guidance_results,
        "final_train_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        "heldout_loss_dstl": heldout,
        "output_dir": str(cfg.output_dir),
    }
    if logger is not None:
        logger.log_metrics({"final/default_guidance": guidance, "final/train_seconds": train_seconds,
                            **{f"final/heldout_loss_dstl_{who}_{kind}": v for who, by_kind in heldout.items()
                               for kind, v in by_kind.items()}})
        logger.experiment.log_dict(logger.run_id, metrics, f"{stage.replace('@', '_')}_metrics.json")
    return metrics


def stage_config(stage: str, variant: str | None = None, path: str | os.PathLike | None = None) -> DistillConfig:
    """The config of a DVC stage: the shared ``distill`` section, then the stage's section, then
    (for ``distill_8``) its variant from ``distill_8_variants``. Each run checkpoints in a folder
    of its own under ``checkpoint_dir``. ``path``: the params file (default: ``BUDGETDIFF_PARAMS``
    or params.yaml)."""
    from mlops.params import config_from_dict, load_config, load_params, params_path

    if variant is None:
        cfg, name = load_config("distill", DistillConfig, path, overrides=(stage,)), stage
    else:
        variants = load_params(f"{stage}_variants", path)
        if not isinstance(variants, dict) or variant not in variants:
            raise UsageError(f"unknown variant {variant!r} of {stage} (one of {', '.join(variants or ())})")
        data = {**load_params("distill", path), **load_params(stage, path), **(variants[variant] or {})}
        where = f"params file {params_path(path)}: section 'distill' + {stage!r} + '{stage}_variants.{variant}'"
        cfg, name = config_from_dict(DistillConfig, data, where), f"{stage}@{variant}"
    return dataclasses.replace(cfg, checkpoint_dir=str(Path(cfg.checkpoint_dir) / name.replace("@", "_")), stage=name)


@command
def main() -> None:
    import sys

    from budgetdiff.io import atomic_write_json as write_json

    if len(sys.argv) < 2:
        raise UsageError("usage: python -m training.distill STAGE [VARIANT]")
    cfg = stage_config(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    metrics = train(cfg)
    write_json(cfg.metrics_path, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "guidance_sweep"}))


if __name__ == "__main__":
    main()
