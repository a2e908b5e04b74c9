"""What every training shares: the Lightning ``Trainer`` and the learning-rate schedule.

- ``make_trainer``: one device (the GPU when there is one), bf16-mixed on a GPU unless a model
  asks for full precision, no model summary and no sanity validation; checkpoints every
  ``checkpoint_every`` steps to ``checkpoint_dir`` (``last.ckpt``, so a rerun resumes) when given.
- ``warmup_cosine``: linear warm-up over ``warmup`` steps, then (from ``decay_start``, by
  default the end of the warm-up) cosine decay to 5 % of the peak rate at ``total`` steps.
"""

from __future__ import annotations

import math
import os
from typing import Iterable

import lightning as L
import torch

FINAL_LR_FRACTION = 0.05  # the cosine decays to 5 % of the peak learning rate


def warmup_cosine(step: int, total: int, warmup: int = 0, decay_start: int | None = None) -> float:
    """The learning rate at optimizer step ``step`` as a fraction of the peak: ``min(1, (step + 1)
    / warmup)`` (1 without warm-up) times the decay, which holds 1 until ``decay_start`` (default
    ``warmup``) and then follows half a cosine to ``FINAL_LR_FRACTION`` at ``total``."""
    start = warmup if decay_start is None else decay_start
    if step < start:
        decay = 1.0
    else:
        progress = min(1.0, (step - start) / max(1, total - start))
        decay = FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))
    return decay * min(1.0, (step + 1) / warmup) if warmup else decay


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int = 0,
                            decay_start: int | None = None) -> dict:
    """``warmup_cosine`` as a per-step ``LambdaLR``, in the form ``configure_optimizers`` returns
    under ``"lr_scheduler"``."""

    def factor(step: int) -> float:
        return warmup_cosine(step, total, warmup, decay_start)

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}


def make_trainer(logger, *, callbacks: Iterable = (), gpu: bool | None = None, mixed_precision: bool = True,
                 progress_every: int | None = 10, checkpoint_dir: str | os.PathLike | None = None,
                 checkpoint_every: int | None = None, **options) -> L.Trainer:
    """The project's Lightning ``Trainer``.

    Args:
        logger: a Lightning logger (``mlops.tracking.mlflow_logger``), or False for none.
        callbacks: the model's own callbacks (early stopping, ...).
        gpu: train on the GPU; default: when one is available.
        mixed_precision: bf16-mixed on the GPU (default True); full precision on the CPU always.
        progress_every: refresh the progress bar every this many steps; None: no progress bar.
        checkpoint_dir, checkpoint_every: save ``last.ckpt`` there every this many steps (both or
            neither); without them Lightning writes no checkpoint.
        options: further ``L.Trainer`` arguments (``max_steps``, ``gradient_clip_val``, ...).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    gpu = torch.cuda.is_available() if gpu is None else gpu
    callbacks = list(callbacks)
    if checkpoint_dir is not None:
        callbacks.insert(0, ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=checkpoint_every,
                                            save_last=True, enable_version_counter=False, save_top_k=0))
    else:
        options["enable_checkpointing"] = False
    if progress_every is not None:
        callbacks.append(TQDMProgressBar(refresh_rate=progress_every))
    return L.Trainer(accelerator="gpu" if gpu else "cpu", devices=1,
                     precision="bf16-mixed" if gpu and mixed_precision else "32-true", logger=logger,
                     callbacks=callbacks, enable_progress_bar=progress_every is not None,
                     enable_model_summary=False, num_sanity_val_steps=0, **options)
