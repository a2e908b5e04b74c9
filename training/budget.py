"""Train the BudgetFusion predictor (``budgetdiff.methods.budget``) on the prompt/step/metric dataset.

Recipe:
- Data: ``data/dataset.parquet`` (the ``dataset`` stage). One example per prompt: its token
  embeddings from the budgeted model's own frozen text encoder (computed once, before training:
  the encoder never changes), and as targets every metric at every grid step count, plus the
  reference-step value of each metric that needs no reference image. A prompt rendered with
  several seeds (``render.seeds_per_prompt``) has the mean over its seeds as targets: the
  expected curve, which is what the prompt determines (one seed's curve also carries that seed's
  noise, which no prompt-only predictor can learn). Targets are z-scored per metric on the train
  split (``TargetNormalizer``; distances sign-flipped).
- Loss: MSE on the normalised targets, masked where a value is missing (a reference-based metric
  at the reference step, a missing image).
- Optimiser: AdamW; the learning rate halves when the val split's loss stalls for
  ``lr_patience`` epochs; early stopping after ``patience`` epochs without a better val loss, and
  the best val epoch's weights are the ones saved.
- The plateau rule's ε (``budgetdiff.methods.budget.PlateauRule``) is chosen per network on the val split
  when ``calibrate_epsilon`` is set: the largest candidate whose per-prompt choices keep every
  level's mean realised quality (looked up in the rendered curves) within ``max_drop_pct`` % of
  the ``full_steps`` images'. It is saved in the model's config as the default rule.
- Two networks, the same data and loop: the BiLSTM over token embeddings (the model,
  ``models/budget``) and the pooled-embedding MLP (the ablation, ``models/budget/mlp``).
- MLflow: one run per network (params, per-epoch train/val loss, val MAE per metric in the
  metric's own units, the saved model directory as an artifact), tagged with the commit and stage.

``train(cfg) -> metrics`` is the plain entry point (DVC stage ``train_budget``, tests), with
``cfg`` a ``TrainBudgetConfig``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from budgetdiff.methods.budget import (
    ABLATION_SUBDIR,
    DEFAULT_RULE_METRICS,
    BudgetPredictor,
    PlateauRule,
    TargetNormalizer,
    build_network,
    choose_steps,
    make_config,
    metric_kind,
    model_record,
    quality_fraction,
    resolve_metric,
    save_budget_model,
    text_encoder_of,
)
from budgetdiff.text import encode_prompts
from mlops.cli import command
from mlops.params import config_dict
from training.trainer import make_trainer

STAGE = "train_budget"
ARCHITECTURES = ("bilstm", "mlp")


# ------------------------------------------------------------------------------------------------
# Config: params.yaml's train_budget section
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrateEpsilon:
    """``train_budget.calibrate_epsilon``: the plateau ε chosen on the val split."""

    candidates: list[float]
    full_steps: int
    max_drop_pct: float


@dataclass(frozen=True)
class BiLSTMNetwork:
    """``train_budget.bilstm``: keyword arguments of the BiLSTM predictor (field order is the saved config's)."""

    hidden: int
    layers: int
    dropout: float


@dataclass(frozen=True)
class MLPNetwork:
    """``train_budget.mlp``: keyword arguments of the pooled-embedding MLP (the ablation)."""

    hidden: int
    dropout: float


@dataclass(frozen=True)
class TrainBudgetConfig:
    """params.yaml's ``train_budget`` section."""

    dataset: str
    model: str
    seed: int
    plateau_epsilon: float
    psnr_cap_db: float
    bilstm: BiLSTMNetwork
    mlp: MLPNetwork
    batch_size: int
    lr: float
    weight_decay: float
    max_epochs: int
    patience: int
    val_split: str
    output_dir: str
    metrics_path: str
    render_report: Optional[str] = None
    metrics: Optional[list[str]] = None
    rule_metrics: Optional[dict[str, str]] = None  # None: budgetdiff.methods.budget.DEFAULT_RULE_METRICS
    calibrate_epsilon: Optional[CalibrateEpsilon] = None  # None: plateau_epsilon as is
    lr_patience: int = 10
    train_split: str = "train"


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
@dataclass
class CurveTable:
    """The dataset as one row per prompt: ``values`` (N, M, G + 1) holds each metric at every grid
    step count and, in the last column, at the reference step count (NaN for the metrics that
    compare with the reference, whose value there is trivially perfect). A prompt rendered with
    several seeds holds the mean over its seeds (``seeds``: how many): its expected curve, the
    target a predictor that reads only the prompt can learn, and the realised quality an
    allocation gets on average (the rule metrics' quality is linear in the metric)."""

    prompt_ids: np.ndarray
    prompts: list[str]
    splits: np.ndarray
    complexity: np.ndarray
    step_grid: list[int]
    reference_steps: int
    metrics: list[str]
    values: np.ndarray
    seeds: np.ndarray | None = None

    def subset(self, split: str) -> np.ndarray:
        """Row indices of ``split``."""
        return np.flatnonzero(self.splits == split)

    @property
    def points(self) -> list[str]:
        """Names of the last axis of ``values``: the grid step counts, then the reference."""
        return [str(s) for s in self.step_grid] + [f"reference_{self.reference_steps}"]

    def mean_curve(self, rows: np.ndarray) -> np.ndarray:
        """(M, G + 1) mean of ``rows``' values, NaN where none is finite: the prompt-blind baseline."""
        values = self.values[rows]
        seen = np.isfinite(values).sum(0)
        return np.where(seen > 0, np.nansum(values, 0) / np.maximum(seen, 1), np.nan)


def dataset_curves(table: pd.DataFrame, metrics: Sequence[str] | None = None) -> CurveTable:
    """Pivot the dataset (one row per image) to one row per prompt (``CurveTable``), averaging a
    prompt's seeds."""
    if "is_reference" not in table or "steps" not in table:
        raise ValueError("dataset: needs the columns steps and is_reference")
    metrics = list(metrics) if metrics else [c for c in table.columns if "/" in c]
    missing = [m for m in metrics if m not in table.columns]
    if missing:
        raise ValueError(f"dataset: no column {', '.join(missing)}")
    for m in metrics:
        metric_kind(m)  # unknown families fail here, by name
    refs = sorted(table.loc[table["is_reference"], "steps"].unique())
    if len(refs) != 1:
        raise ValueError(f"dataset: expected one reference step count, found {refs}")
    grid = sorted(int(s) for s in table.loc[~table["is_reference"], "steps"].unique())
    prompts = table.drop_duplicates("prompt_id").sort_values("prompt_id")
    columns = [*grid, int(refs[0])]
    values = np.full((len(prompts), len(metrics), len(columns)), np.nan)
    for i, m in enumerate(metrics):
        wide = table.pivot_table(index="prompt_id", columns="steps", values=m, aggfunc="mean", dropna=False)
        wide = wide.reindex(index=prompts["prompt_id"].to_numpy(), columns=columns)
        values[:, i] = wide.to_numpy(dtype=np.float64)
        if metric_kind(m) != "no_reference":
            values[:, i, -1] = np.nan
    values[~np.isfinite(values)] = np.nan
    if "seed" in table:
        seeds = table.groupby("prompt_id")["seed"].nunique().reindex(prompts["prompt_id"].to_numpy()).to_numpy()
    else:
        seeds = np.ones(len(prompts), dtype=np.int64)
    return CurveTable(prompts["prompt_id"].to_numpy(), prompts["prompt"].astype(str).tolist(),
                      prompts["split"].astype(str).to_numpy(), prompts["complexity"].to_numpy(),
                      grid, int(refs[0]), metrics, values, seeds.astype(np.int64))


@dataclass
class EmbeddingTable:
    """Precomputed frozen-encoder embeddings for every prompt, padded to the longest prompt."""

    hidden: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    truncated: list[bool]


def embed_prompts(prompts: list[str], text_encoder, tokenizer, max_length: int, batch_size: int = 256) -> EmbeddingTable:
    """Encode ``prompts`` once, in chunks (memory ~ N x longest x width x 4 bytes: 1.2 GB for
    18k prompts of 45 tokens at width 384)."""
    chunks = [encode_prompts(prompts[i:i + batch_size], text_encoder, tokenizer, max_length=max_length, device="cpu")
              for i in range(0, len(prompts), batch_size)]
    longest = max(c.hidden.shape[1] for c in chunks)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, 0, 0, longest - x.shape[1]) if x.dim() == 3 else (0, longest - x.shape[1]))

    return EmbeddingTable(torch.cat([pad(c.hidden) for c in chunks]).float(), torch.cat([pad(c.mask) for c in chunks]),
                          torch.cat([c.pooled for c in chunks]).float(), [t for c in chunks for t in c.truncated])


def load_text_encoder(model_dir: str):
    """The budgeted model's pipeline (CPU) and its (text encoder, tokenizer, max tokens)."""
    from budgetdiff.generation.loading import load_pipeline

    pipe = load_pipeline(model_dir, device="cpu")
    return pipe, text_encoder_of(pipe)


def tensors(emb: EmbeddingTable, z: np.ndarray, rows: np.ndarray) -> TensorDataset:
    """(hidden, mask, pooled, target z with NaN -> 0, valid mask) for ``rows``."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    target = torch.as_tensor(z[rows], dtype=torch.float32)
    valid = torch.isfinite(target)
    return TensorDataset(emb.hidden[idx], emb.mask[idx], emb.pooled[idx], torch.nan_to_num(target), valid.float())


# ------------------------------------------------------------------------------------------------
# Lightning
# ------------------------------------------------------------------------------------------------
def masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return ((pred - target) ** 2 * valid).sum() / valid.sum().clamp(min=1.0)


class BudgetModule(L.LightningModule):
    """Trains a curve predictor (``budgetdiff.methods.budget.build_network(network_config)``) on
    normalised targets."""

    def __init__(self, network_config: dict, lr: float, weight_decay: float, lr_patience: int = 10):
        super().__init__()
        self.save_hyperparameters({"architecture": network_config["architecture"],
                                   "network": network_config.get("network", {}), "lr": lr,
                                   "weight_decay": weight_decay, "lr_patience": lr_patience})
        self.network = build_network(network_config)
        self.lr, self.weight_decay, self.lr_patience = lr, weight_decay, lr_patience

    def model_step(self, batch) -> torch.Tensor:
        hidden, mask, pooled, target, valid = batch
        return masked_mse(self.network(hidden, mask, pooled), target, valid)

    def training_step(self, batch, batch_idx):
        loss = self.model_step(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch[0].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.model_step(batch)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch[0].shape[0])

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.network.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        # Halve the learning rate when val/loss stalls; early stopping (patience > this) ends the run.
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=self.lr_patience)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/loss", "interval": "epoch"}}


class KeepBestWeights(L.Callback):
    """Keep a copy of the weights of the epoch with the lowest ``val/loss`` (restored after fit)."""

    def __init__(self):
        self.best, self.best_epoch, self.state = float("inf"), -1, None

    def on_validation_epoch_end(self, trainer, module):
        if trainer.sanity_checking:
            return
        loss = float(trainer.callback_metrics.get("val/loss", float("inf")))
        if loss < self.best:
            self.best, self.best_epoch = loss, trainer.current_epoch
            self.state = copy.deepcopy(module.network.state_dict())


def predict_z(network: torch.nn.Module, emb: EmbeddingTable, rows: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """(len(rows), M, P) normalised predictions."""
    network.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            idx = torch.as_tensor(rows[i:i + batch_size], dtype=torch.long)
            out.append(network(emb.hidden[idx], emb.mask[idx], emb.pooled[idx]).double().numpy())
    return np.concatenate(out) if out else np.zeros((0,))


def mae_by_metric(pred: np.ndarray, true: np.ndarray, metrics: list[str], points: list[str]) -> dict:
    """{metric: {"mean": MAE, step count: MAE}} over the finite targets (the metric's own units)."""
    out = {}
    err = np.abs(pred - true)
    for i, m in enumerate(metrics):
        per_point = {p: float(np.nanmean(err[:, i, j])) for j, p in enumerate(points) if np.isfinite(err[:, i, j]).any()}
        out[m] = {"mean": float(np.nanmean(err[:, i])), **per_point}
    return out


def fit_network(arch: str, network_config: dict, cfg: TrainBudgetConfig, emb: EmbeddingTable, z: np.ndarray,
                train_rows: np.ndarray, val_rows: np.ndarray, logger=None,
                progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """Train one network with early stopping on ``val_rows``; returns the best-val network.
    ``progress``: a progress line per epoch."""
    from lightning.pytorch.callbacks import EarlyStopping

    L.seed_everything(cfg.seed, workers=True)
    module = BudgetModule(network_config, cfg.lr, cfg.weight_decay, cfg.lr_patience)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(tensors(emb, z, train_rows), batch_size=cfg.batch_size, shuffle=True,
                              generator=generator)
    val_loader = DataLoader(tensors(emb, z, val_rows), batch_size=max(len(val_rows), 1))
    best = KeepBestWeights()
    trainer = make_trainer(logger or False, gpu=False,
                           callbacks=[best, EarlyStopping(monitor="val/loss", patience=cfg.patience, mode="min")],
                           progress_every=max(1, len(train_loader)) if progress else None,
                           max_epochs=cfg.max_epochs, log_every_n_steps=max(1, len(train_loader)), deterministic=True)
    t0 = time.time()
    trainer.fit(module, train_loader, val_loader)
    seconds = time.time() - t0
    if best.state is not None:
        module.network.load_state_dict(best.state)
    network = module.network.eval()
    info = {"epochs": int(trainer.current_epoch), "best_epoch": int(best.best_epoch),
            "best_val_loss": float(best.best), "train_seconds": round(seconds, 2),
            "parameters": int(sum(p.numel() for p in network.parameters())),
            "final_train_loss": float(trainer.callback_metrics.get("train/loss", float("nan")))}
    return network, info


# ------------------------------------------------------------------------------------------------
# Realised quality on the rendered curves, and the plateau ε chosen on the val split
# ------------------------------------------------------------------------------------------------
def level_quality(curves: CurveTable, rows: np.ndarray, levels: dict[str, str], psnr_cap_db: float) -> dict:
    """{level: (prompts, grid) rendered quality as a fraction of the reference}
    (``budgetdiff.methods.budget.quality_fraction`` of each level's rule metric)."""
    out = {}
    for level, m in levels.items():
        i = curves.metrics.index(m)
        out[level] = np.stack([quality_fraction(m, curves.values[r, i, :-1], curves.values[r, i, -1], psnr_cap_db)
                               for r in rows])
    return out


def drop_vs_full(steps: np.ndarray, quality: dict, grid: list[int], full_steps: int) -> dict[str, float]:
    """Per level, the % by which the mean realised quality at ``steps`` falls short of the mean
    quality at ``full_steps``."""
    col = np.array([grid.index(int(s)) for s in steps])
    full = grid.index(full_steps)
    n = np.arange(len(steps))
    return {lv: float(100 * (q[:, full].mean() - q[n, col].mean()) / q[:, full].mean()) for lv, q in quality.items()}


def calibrate_epsilon(predictor: BudgetPredictor, z: np.ndarray, curves: CurveTable, rows: np.ndarray,
                      candidates: Sequence[float], full_steps: int, max_drop_pct: float) -> tuple[float, list[dict]]:
    """The plateau ε for ``predictor``, chosen on held-out ``rows`` (the val split): the largest
    candidate (fewest steps) whose choices keep every level's mean realised quality within
    ``max_drop_pct`` % of ``full_steps``'; the smallest candidate when none does."""
    if full_steps not in curves.step_grid:
        raise ValueError(f"calibrate_epsilon.full_steps: {full_steps} is not a grid step count {curves.step_grid}")
    predicted = predictor.curves_from_normalized(z)
    quality = level_quality(curves, rows, predictor.rule_metrics, predictor.config["rules"]["psnr_cap_db"])
    table = []
    for eps in sorted(float(c) for c in candidates):
        steps = np.array([choose_steps(c, PlateauRule(eps)).steps for c in predicted])
        drops = drop_vs_full(steps, quality, curves.step_grid, full_steps)
        table.append({"epsilon": eps, "mean_steps": round(float(steps.mean()), 3),
                      "drop_vs_full_pct": {lv: round(d, 3) for lv, d in drops.items()},
                      "within": bool(all(d <= max_drop_pct for d in drops.values()))})
    within = [row["epsilon"] for row in table if row["within"]]
    return (max(within) if within else table[0]["epsilon"]), table


def network_config(arch: str, cfg: TrainBudgetConfig, emb: EmbeddingTable, max_length: int, curves: CurveTable,
                   normalizer: TargetNormalizer, model: dict, epsilon: float, extra: dict | None = None) -> dict:
    """The budget model config of one ``train_budget`` network (``budgetdiff.methods.budget.make_config``)."""
    return make_config(arch, config_dict(getattr(cfg, arch)), text_dim=emb.hidden.shape[-1], max_text_length=max_length,
                       step_grid=curves.step_grid, reference_steps=curves.reference_steps,
                       metrics=curves.metrics, rule_metrics=cfg.rule_metrics or DEFAULT_RULE_METRICS,
                       normalizer=normalizer, model=model, plateau_epsilon=epsilon,
                       psnr_cap_db=cfg.psnr_cap_db, extra=extra)


def cross_validate(cfg: TrainBudgetConfig, table: pd.DataFrame, folds: int, seed: int = 0,
                   progress=None) -> dict[str, Any]:
    """K-fold cross-validation of ``train(cfg)``'s recipe over every prompt of the dataset, so that
    each prompt is predicted once by networks that never saw it: the prompts are shuffled (``seed``)
    into ``folds`` folds; fold k is the test fold, fold k + 1 the val fold (early stopping and the
    plateau ε, as in ``train``), the rest the train folds (and the normaliser's statistics).

    Returns, per architecture, each prompt's chosen step count under the plateau rule at its fold's
    calibrated ε (``steps``, aligned with ``rows``), the ε per fold and each prompt's predicted
    curves in metric units (``predicted``, (N, M, G + 1)); ``mean_curve``: the same from each
    fold's train-mean curve (the prompt-blind baseline).

    ``cfg``: the ``train_budget`` config."""
    if folds < 3:
        raise ValueError(f"cross_validation.folds: needs at least 3 (test, val, train), got {folds}")
    curves = dataset_curves(table, cfg.metrics)
    n = len(curves.prompts)
    if n < folds:
        raise ValueError(f"cross_validation.folds: {folds} folds but only {n} prompts")
    order = np.random.default_rng(seed).permutation(n)
    fold_of = np.empty(n, dtype=int)
    fold_of[order] = np.arange(n) % folds
    _, (encoder, tokenizer, max_length) = load_text_encoder(cfg.model)
    emb = embed_prompts(curves.prompts, encoder, tokenizer, max_length)
    model = model_record(cfg.model)
    rule_metrics = {level: resolve_metric(name, curves.metrics)
                    for level, name in (cfg.rule_metrics or DEFAULT_RULE_METRICS).items()}
    out: dict[str, Any] = {"rows": np.arange(n), "fold": fold_of, "curves": curves, "levels": rule_metrics,
                           "mean_curve": {"predicted": np.full(curves.values.shape, np.nan)}}
    for arch in ARCHITECTURES:
        out[arch] = {"steps": np.zeros(n, dtype=int), "epsilon": [], "predicted": np.full(curves.values.shape, np.nan)}
    for k in range(folds):
        test, val = np.flatnonzero(fold_of == k), np.flatnonzero(fold_of == (k + 1) % folds)
        train_rows = np.flatnonzero((fold_of != k) & (fold_of != (k + 1) % folds))
        normalizer = TargetNormalizer.fit(curves.metrics, curves.values[train_rows])
        z = normalizer.normalize(curves.values)
        out["mean_curve"]["predicted"][test] = curves.mean_curve(train_rows)
        for arch in ARCHITECTURES:
            epsilon = cfg.plateau_epsilon
            config = network_config(arch, cfg, emb, max_length, curves, normalizer, model, epsilon)
            network, _ = fit_network(arch, config, cfg, emb, z, train_rows, val, progress=False)
            predictor = BudgetPredictor(network, config)
            if cfg.calibrate_epsilon:
                c = cfg.calibrate_epsilon
                epsilon, _ = calibrate_epsilon(predictor, predict_z(network, emb, val), curves, val, c.candidates,
                                               c.full_steps, c.max_drop_pct)
            z_test = predict_z(network, emb, test)
            out[arch]["predicted"][test] = normalizer.denormalize(z_test)
            predicted = predictor.curves_from_normalized(z_test, [emb.truncated[i] for i in test])
            out[arch]["steps"][test] = [choose_steps(c, PlateauRule(epsilon)).steps for c in predicted]
            out[arch]["epsilon"].append(float(epsilon))
        if progress is not None:
            progress(k + 1, folds)
    return out


# ------------------------------------------------------------------------------------------------
# train(cfg)
# ------------------------------------------------------------------------------------------------
def rendered_settings(render_report: str | None) -> dict:
    """The scheduler and guidance the dataset's images were rendered with (reports/render.json):
    the curves, and so the predictor, hold for these settings; and how many seeds each prompt's
    curves average."""
    if not render_report or not Path(render_report).is_file():
        return {}
    report = json.loads(Path(render_report).read_text())
    return {k: report[k] for k in ("scheduler", "guidance", "seeds_per_prompt") if k in report}


def flat_params(cfg: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return out


def train(cfg: TrainBudgetConfig, progress: bool = True) -> dict[str, Any]:
    """Train the BiLSTM predictor and its MLP ablation per ``cfg`` (the ``train_budget`` params
    section), save both to ``cfg.output_dir`` and return the metrics. ``progress``: a progress
    line per epoch."""
    from mlops.tracking import mlflow_logger

    try:
        table = pd.read_parquet(cfg.dataset)
    except FileNotFoundError:
        raise ValueError(f"train_budget.dataset: {cfg.dataset} does not exist (dvc repro dataset)") from None
    curves = dataset_curves(table, cfg.metrics)
    train_rows, val_rows = curves.subset(cfg.train_split), curves.subset(cfg.val_split)
    for name, rows in (("train_split", train_rows), ("val_split", val_rows)):
        if len(rows) == 0:
            raise ValueError(f"train_budget.{name}: split {getattr(cfg, name)!r} has no prompts in {cfg.dataset}")
    normalizer = TargetNormalizer.fit(curves.metrics, curves.values[train_rows])
    z = normalizer.normalize(curves.values)

    print(f"train_budget: {len(curves.prompts)} prompts ({len(train_rows)} train, {len(val_rows)} val), "
          f"{len(curves.metrics)} metrics x {len(curves.step_grid)} step counts + reference; encoding with "
          f"{cfg.model}'s text encoder", flush=True)
    t0 = time.time()
    _, (encoder, tokenizer, max_length) = load_text_encoder(cfg.model)
    emb = embed_prompts(curves.prompts, encoder, tokenizer, max_length)
    encode_seconds = time.time() - t0
    model = model_record(cfg.model)
    rendered_with = rendered_settings(cfg.render_report)
    points = curves.points

    def config_for(arch: str, epsilon: float, extra: dict | None = None) -> dict:
        return network_config(arch, cfg, emb, max_length, curves, normalizer, model, epsilon, extra)

    # The train-mean curve: what a predictor that ignores the prompt scores.
    mean_curve = curves.mean_curve(train_rows)
    true_val = curves.values[val_rows]
    baseline = mae_by_metric(np.broadcast_to(mean_curve, true_val.shape), true_val, curves.metrics, points)

    results, saved = {}, {}
    for arch in ARCHITECTURES:
        logger = mlflow_logger(STAGE, run_name=STAGE if arch == "bilstm" else f"{STAGE}_{arch}")
        logger.log_hyperparams({**flat_params(config_dict(cfg)), "architecture": arch, "model_unet_sha256": model["unet_sha256"],
                                "step_grid": json.dumps(curves.step_grid), "reference_steps": curves.reference_steps,
                                "train_prompts": len(train_rows), "val_prompts": len(val_rows)})
        print(f"train_budget: fitting {arch}", flush=True)
        network, info = fit_network(arch, config_for(arch, cfg.plateau_epsilon), cfg, emb, z, train_rows,
                                    val_rows, logger, progress)
        z_val = predict_z(network, emb, val_rows)
        info["val_mae"] = mae_by_metric(normalizer.denormalize(z_val), true_val, curves.metrics, points)
        info["val_mae_mean_curve_baseline"] = baseline
        epsilon, calibration = cfg.plateau_epsilon, None
        if cfg.calibrate_epsilon:
            c = cfg.calibrate_epsilon
            epsilon, calibration = calibrate_epsilon(BudgetPredictor(network, config_for(arch, epsilon)), z_val, curves,
                                                     val_rows, c.candidates, c.full_steps, c.max_drop_pct)
            logger.log_metrics({"final/plateau_epsilon": epsilon})
        info["plateau_epsilon"], info["epsilon_calibration_on_val"] = epsilon, calibration
        results[arch] = info
        saved[arch] = (network, config_for(arch, epsilon, {"rendered_with": rendered_with, "training": {
            "stage": STAGE, "dataset": str(cfg.dataset), "train_prompts": int(len(train_rows)),
            "val_prompts": int(len(val_rows)), **{k: info[k] for k in ("epochs", "best_epoch", "best_val_loss")},
            "epsilon_calibration_on_val": calibration}}))
        logger.log_metrics({f"final/val_mae/{m.replace('/', '_')}": v["mean"] for m, v in info["val_mae"].items()}
                           | {"final/best_val_loss": info["best_val_loss"]})
        saved[arch + "_logger"] = logger

    out_dir = Path(cfg.output_dir)
    save_budget_model(*saved["bilstm"], out_dir, subdirs={ABLATION_SUBDIR: saved["mlp"]})
    for arch in ARCHITECTURES:
        logger = saved[arch + "_logger"]
        artifact_dir = out_dir if arch == "bilstm" else out_dir / ABLATION_SUBDIR
        logger.experiment.log_artifacts(logger.run_id, str(artifact_dir), "budget_model")
        logger.finalize("success")

    return {
        "prompts": {"train": int(len(train_rows)), "val": int(len(val_rows)), "all": len(curves.prompts)},
        "step_grid": curves.step_grid, "reference_steps": curves.reference_steps, "metrics": curves.metrics,
        "model": model, "encode_seconds": round(encode_seconds, 2),
        "prompts_truncated": int(sum(emb.truncated)),
        "normalization": normalizer.to_dict(),
        "bilstm": results["bilstm"], "mlp": results["mlp"],
        "output_dir": str(out_dir),
    }


@command
def main() -> None:
    from budgetdiff.io import atomic_write_json as write_json
    from mlops.params import load_config

    cfg = load_config(STAGE, TrainBudgetConfig)
    metrics = train(cfg)
    write_json(cfg.metrics_path, metrics)
    for arch in ARCHITECTURES:
        r = metrics[arch]
        maes = " ".join(f"{m.split('/')[1].split('_')[0]}={v['mean']:.4g}" for m, v in r["val_mae"].items())
        print(f"{arch}: {r['parameters']} parameters, {r['epochs']} epochs (best {r['best_epoch']}), "
              f"{r['train_seconds']:.0f} s; val MAE {maes}")
    base = metrics["bilstm"]["val_mae_mean_curve_baseline"]
    print("mean-curve baseline: val MAE " + " ".join(f"{m.split('/')[1].split('_')[0]}={v['mean']:.4g}"
                                                   for m, v in base.items()))


if __name__ == "__main__":
    main()
