"""training/trainer.py: the one learning-rate schedule and the one Trainer reproduce exactly what
the four trainings built on their own before (same learning rate at every step, same Trainer)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar

from training.trainer import make_trainer, warmup_cosine, warmup_cosine_scheduler


# The four schedules as they were written in training/ before they became one (copied verbatim).
def former_warmup_fraction(total: int, warmup_fraction: float):  # clip.py, attributes.py
    warmup = max(1, int(warmup_fraction * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor, (total, warmup, None)


def former_warmup_steps(total: int, warmup: int):  # distill.py
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor, (total, warmup, None)


def former_hold_then_decay(total: int, lr_decay_start: float, warmup: int):  # base.py
    start = int(lr_decay_start * total)

    def factor(step: int) -> float:
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, total - start))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    def warmed(step: int) -> float:
        return factor(step) * min(1.0, (step + 1) / warmup) if warmup else factor(step)

    return warmed, (total, warmup, start)


FORMER = [former_warmup_fraction(4000, 0.05), former_warmup_fraction(10, 0.5), former_warmup_fraction(3, 0.01),
          former_warmup_steps(500, 50), former_warmup_steps(300, 0), former_warmup_steps(7, 7),
          former_hold_then_decay(20000, 0.5, 0), former_hold_then_decay(6000, 0.2, 200),
          former_hold_then_decay(100, 0.0, 30), former_hold_then_decay(50, 0.1, 1)]


@pytest.mark.parametrize("former, args", FORMER)
def test_the_schedule_is_the_former_one_at_every_step(former, args):
    total, warmup, start = args
    steps = sorted({*range(0, min(total, 300)), *range(0, total + 20, max(1, total // 97)), total - 1, total,
                    total + 5, warmup - 1, warmup, warmup + 1} - {-1})
    for step in steps:
        assert warmup_cosine(step, total, warmup, start) == former(step), step  # bit for bit, not approx


def test_the_schedule_has_its_shape():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == 1.0
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.05 + 0.95 * 0.5)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.05) == warmup_cosine(500, 100, 10)
    assert warmup_cosine(40, 100, 0, decay_start=50) == 1.0  # held until the decay starts


def test_the_scheduler_steps_an_optimizer_like_the_former_lambda():
    former, (total, warmup, start) = former_hold_then_decay(60, 0.25, 8)
    p_old, p_new = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt_old, opt_new = torch.optim.AdamW([p_old], lr=1e-3), torch.optim.AdamW([p_new], lr=1e-3)
    old = torch.optim.lr_scheduler.LambdaLR(opt_old, former)
    new = warmup_cosine_scheduler(opt_new, total, warmup, decay_start=start)
    assert new["interval"] == "step"
    for _ in range(total + 3):
        assert opt_new.param_groups[0]["lr"] == opt_old.param_groups[0]["lr"]
        opt_old.step()
        opt_new.step()
        old.step()
        new["scheduler"].step()
    assert new["scheduler"].state_dict()["lr_lambdas"] == [None]  # a checkpoint holds what it held before


def summary(trainer: L.Trainer) -> dict:
    """What distinguishes one Trainer configuration from another."""
    ckpt = trainer.checkpoint_callback
    return {"accelerator": type(trainer.accelerator).__name__, "precision": trainer.precision,
            "devices": trainer.num_devices, "max_steps": trainer.max_steps, "max_epochs": trainer.max_epochs,
            "callbacks": [type(c).__name__ for c in trainer.callbacks],
            "progress": trainer.progress_bar_callback is not None and trainer.progress_bar_callback.refresh_rate,
            "checkpoint": ckpt and (ckpt.dirpath, ckpt._every_n_train_steps, ckpt.save_last, ckpt.save_top_k,
                                    ckpt._enable_version_counter),
            "log_every_n_steps": trainer.log_every_n_steps, "gradient_clip_val": trainer.gradient_clip_val,
            "limit_val_batches": trainer.limit_val_batches, "num_sanity_val_steps": trainer.num_sanity_val_steps,
            "logger": trainer.logger}


def built(make) -> dict:
    """``summary`` of the Trainer ``make()`` builds, and whether it turned on deterministic algorithms."""
    torch.use_deterministic_algorithms(False)
    trainer = make()
    return {**summary(trainer), "deterministic": torch.are_deterministic_algorithms_enabled()}


def test_make_trainer_builds_the_five_former_trainers(tmp_path):
    """The Trainers of train_attributes, train_clip, train_base / finetune_base and distill (built
    alike), and train_budget (with and without progress bar), as each file built them before, on
    the CPU (``gpu`` False; on a GPU both sides switch accelerator and precision alike)."""
    gpu = False
    early = {"monitor": "val/loss", "patience": 5, "mode": "min"}
    former = {
        "attributes": lambda: L.Trainer(
            max_steps=40, accelerator="gpu" if gpu else "cpu", devices=1, precision="32-true", logger=False,
            callbacks=[TQDMProgressBar(refresh_rate=10)], log_every_n_steps=10, enable_model_summary=False,
            enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0),
        "clip": lambda: L.Trainer(
            max_steps=40, accelerator="gpu" if gpu else "cpu", devices=1, precision="bf16-mixed" if gpu else "32-true",
            logger=False, callbacks=[TQDMProgressBar(refresh_rate=10)], log_every_n_steps=10, gradient_clip_val=1.0,
            enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0),
        "base": lambda: L.Trainer(
            max_steps=40, accelerator="gpu" if gpu else "cpu", devices=1, precision="bf16-mixed" if gpu else "32-true",
            logger=False,
            callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=25, save_last=True,
                                       enable_version_counter=False, save_top_k=0),
                       TQDMProgressBar(refresh_rate=10)],
            log_every_n_steps=10, gradient_clip_val=1.0, enable_model_summary=False, num_sanity_val_steps=0,
            limit_val_batches=0),
        "budget": lambda: L.Trainer(
            max_epochs=30, accelerator="cpu", devices=1, logger=False,
            callbacks=[EarlyStopping(**early), TQDMProgressBar(refresh_rate=7)], enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=True, num_sanity_val_steps=0, log_every_n_steps=7,
            deterministic=True),
        "budget_quiet": lambda: L.Trainer(
            max_epochs=30, accelerator="cpu", devices=1, logger=False, callbacks=[EarlyStopping(**early)],
            enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
            num_sanity_val_steps=0, log_every_n_steps=7, deterministic=True),
    }
    now = {
        "attributes": lambda: make_trainer(False, gpu=gpu, mixed_precision=False, max_steps=40, log_every_n_steps=10,
                                           limit_val_batches=0),
        "clip": lambda: make_trainer(False, gpu=gpu, max_steps=40, log_every_n_steps=10, gradient_clip_val=1.0,
                                     limit_val_batches=0),
        "base": lambda: make_trainer(False, gpu=gpu, checkpoint_dir=tmp_path, checkpoint_every=25, max_steps=40,
                                     log_every_n_steps=10, gradient_clip_val=1.0, limit_val_batches=0),
        "budget": lambda: make_trainer(False, gpu=False, callbacks=[EarlyStopping(**early)], progress_every=7,
                                       max_epochs=30, log_every_n_steps=7, deterministic=True),
        "budget_quiet": lambda: make_trainer(False, gpu=False, callbacks=[EarlyStopping(**early)], progress_every=None,
                                             max_epochs=30, log_every_n_steps=7, deterministic=True),
    }
    was = torch.are_deterministic_algorithms_enabled()
    try:
        results = {name: (built(now[name]), built(former[name])) for name in former}
    finally:
        torch.use_deterministic_algorithms(was)
    for name, (new, old) in results.items():
        assert new == old, name
    assert results["base"][0]["checkpoint"][1:] == (25, True, 0, False)
    assert results["budget_quiet"][0]["progress"] is False and results["budget"][0]["deterministic"]
