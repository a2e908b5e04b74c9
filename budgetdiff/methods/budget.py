"""BudgetFusion: predict a prompt's metric curves over step counts, and choose its step budget
before generating (Li, Chen, Su, Sun, arXiv 2412.05780).

The predictor reads the prompt the way the model being budgeted reads it: the token embeddings
of that model's own (frozen) text encoder, ``budgetdiff.text.encode_prompts`` with the tokenizer
and encoder loaded from the pipeline directory. A bidirectional LSTM runs over those embeddings;
one head per metric level (``pixel``, ``mid``, ``high``, ``domain``: the part of the dataset's
metric name before the slash) predicts each of that level's metrics at every step count of the
grid, plus, for the metrics that need no reference image (L-SNR, CLIP-T, attr_acc), their value
at the reference step count. The ablation ``PooledMLPCurvePredictor`` sees only the pooled
sentence embedding.

**Normalisation of the targets.** Per metric m, over every (train prompt, step count) value of
the train split: z = sign_m · (x − mean_m) / std_m, with sign_m = −1 for distances (LPIPS,
DreamSim) and +1 otherwise, so that a higher z is better on every metric. One mean and std per
metric, pooled over step counts, not one per step count: a per-step z-score would flatten every
curve to its mean and erase the gain per step that the plateau rule reads. The network is
trained on z (masked MSE; missing values are masked) and predictions are mapped back to the
metric's own units (``TargetNormalizer.denormalize``).

**Step-choice rules** (``choose_steps``), each applied per level to the metric the model's config
names for it (``rule_metrics``; by default SSIM, LPIPS and I-CLIP, the dataset's knee metrics):

- ``PlateauRule(epsilon)``: BudgetFusion's rule. The gain per extra step between neighbouring
  grid counts s_j < s_{j+1} is g_j = (z(s_{j+1}) − z(s_j)) / (s_{j+1} − s_j), in normalised units
  (train-split standard deviations of the metric) per step. A level's plateau is the smallest s_k
  with g_j < ε for every j ≥ k (the gain stays small from there on); the chosen step count is the
  largest plateau over the levels, i.e. the smallest count after which every level has stopped
  paying for extra steps. The default ε is the trained model's ``rules.plateau_epsilon``, which
  ``train_budget`` chooses on the val split (``training/budget.py``: the largest candidate whose
  choices keep every level within 2 % of the 50-step quality).
- ``QualityTargetRule(q)``: the smallest grid count s such that at s and every larger grid count
  each level's predicted quality reaches a fraction q of the reference (``quality_fraction``):
  SSIM and I-CLIP as they are (similarities to the reference image in [0, 1], 1 for the reference
  itself), 1 − LPIPS for a distance, min(PSNR, cap)/cap for PSNR (cap 40 dB: beyond it two 8-bit
  images look identical), and x / x_ref for a metric without reference (x_ref: its predicted value
  at the reference step count). This is the dataset's knee definition (``pipelines/dataset.py``)
  applied to predicted curves. A prompt whose predicted curves never get there gets the largest
  grid count and ``reached = False``.

The model directory holds ``model.safetensors`` and ``config.json`` (architecture, step grid,
reference step count, metric names, levels, normalisation stats, default rule parameters, and the
model it was trained for: its path and a fingerprint of its UNet files). Using it for another
step grid or another model raises ``BudgetModelMismatch`` naming both.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from budgetdiff.io.fingerprint import FingerprintError, unet_fingerprint
from budgetdiff.text import MAX_TEXT_LENGTH, PromptEmbeddings, encode_prompts

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "budgetdiff-budget-predictor/1"
DEFAULT_BUDGET_DIR = "models/budget"
ABLATION_SUBDIR = "mlp"  # the pooled-MLP ablation is saved beside the BiLSTM, in models/budget/mlp
DEFAULT_PLATEAU_EPSILON = 0.01
DEFAULT_PSNR_CAP_DB = 40.0
DEFAULT_RULE_METRICS = {"pixel": "pixel/ssim", "mid": "mid/lpips", "high": "high/iclip"}

# Metric family (the name after the level, up to the backend) -> how it relates to the reference.
METRIC_KINDS = {
    "ssim": "similarity", "iclip": "similarity",      # similarity to the reference image, in [0, 1]
    "lpips": "distance", "dreamsim": "distance",      # distance to the reference image, 0 = identical
    "psnr": "psnr",                                   # dB against the reference, capped
    "lsnr": "no_reference", "clipt": "no_reference", "attr": "no_reference",  # judge the image alone
}


class BudgetModelError(ValueError):
    """The budget model directory is missing, incomplete or unreadable."""


class BudgetModelMismatch(BudgetModelError):
    """The budget model was trained for another model or another step grid."""


# ------------------------------------------------------------------------------------------------
# Metric names and normalisation
# ------------------------------------------------------------------------------------------------
def metric_level(metric: str) -> str:
    """``pixel/psnr`` -> ``pixel``."""
    return metric.split("/", 1)[0]


def metric_kind(metric: str) -> str:
    """``similarity``, ``distance``, ``psnr`` or ``no_reference`` (``METRIC_KINDS``)."""
    family = metric.split("/", 1)[-1].split("_")[0]
    if family not in METRIC_KINDS:
        raise ValueError(f"metric {metric!r}: unknown family {family!r}; known: {', '.join(METRIC_KINDS)}")
    return METRIC_KINDS[family]


def metric_sign(metric: str) -> float:
    """+1 where higher is better, −1 for distances."""
    return -1.0 if metric_kind(metric) == "distance" else 1.0


def resolve_metric(prefix: str, metrics: Sequence[str]) -> str:
    """The metric named ``prefix`` or starting with ``prefix + "_"`` (``mid/lpips`` ->
    ``mid/lpips_alex_randinit``), as ``dataset.knee.metrics`` resolves its names."""
    matches = [m for m in metrics if m == prefix or m.startswith(prefix + "_")]
    if not matches:
        raise ValueError(f"rule metric {prefix!r} matches none of {', '.join(metrics)}")
    return matches[0]


@dataclass
class TargetNormalizer:
    """Per-metric z-score, pooled over step counts, signed so that higher is better (module
    docstring). ``mean``/``std``/``sign`` are per metric, in ``metrics`` order."""

    metrics: list[str]
    mean: np.ndarray
    std: np.ndarray
    sign: np.ndarray

    @classmethod
    def fit(cls, metrics: Sequence[str], values: np.ndarray) -> "TargetNormalizer":
        """Fit on ``values`` (N, M, P): every finite value of each metric, all step counts pooled."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 3 or values.shape[1] != len(metrics):
            raise ValueError(f"values: expected (prompts, {len(metrics)} metrics, points), got {values.shape}")
        mean, std = np.zeros(len(metrics)), np.ones(len(metrics))
        for i, m in enumerate(metrics):
            finite = values[:, i][np.isfinite(values[:, i])]
            if finite.size == 0:
                raise ValueError(f"metric {m!r} has no finite value to normalise")
            mean[i] = finite.mean()
            std[i] = max(float(finite.std()), 1e-6)  # a constant metric still divides safely
        return cls(list(metrics), mean, std, np.array([metric_sign(m) for m in metrics]))

    def _shape(self, a: np.ndarray, x) -> np.ndarray | torch.Tensor:
        shape = (len(self.metrics), 1)  # broadcast over (..., M, P)
        return torch.as_tensor(a.reshape(shape), dtype=x.dtype, device=x.device) if torch.is_tensor(x) else a.reshape(shape)

    def normalize(self, x):
        """(..., M, P) metric values -> z (numpy or torch)."""
        return self._shape(self.sign, x) * (x - self._shape(self.mean, x)) / self._shape(self.std, x)

    def denormalize(self, z):
        """(..., M, P) z -> metric values (numpy or torch)."""
        return z * self._shape(self.std, z) / self._shape(self.sign, z) + self._shape(self.mean, z)

    def to_dict(self) -> dict:
        return {"method": "z-score per metric over the train split, all step counts pooled; "
                          "sign -1 for distances so higher is better",
                "mean": dict(zip(self.metrics, map(float, self.mean))),
                "std": dict(zip(self.metrics, map(float, self.std))),
                "sign": dict(zip(self.metrics, map(float, self.sign)))}

    @classmethod
    def from_dict(cls, metrics: Sequence[str], d: dict) -> "TargetNormalizer":
        return cls(list(metrics), np.array([d["mean"][m] for m in metrics], dtype=np.float64),
                   np.array([d["std"][m] for m in metrics], dtype=np.float64),
                   np.array([d["sign"][m] for m in metrics], dtype=np.float64))


# ------------------------------------------------------------------------------------------------
# Networks
# ------------------------------------------------------------------------------------------------
def level_groups(metrics: Sequence[str]) -> dict[str, list[str]]:
    """{level: its metrics}, levels in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for m in metrics:
        groups.setdefault(metric_level(m), []).append(m)
    return groups


class CurveHeads(nn.Module):
    """One MLP head per metric level; each predicts its metrics at every output point.

    Returns (B, M, P) in ``metrics`` order (M metrics, P = grid step counts + 1 reference point).
    """

    def __init__(self, in_dim: int, metrics: Sequence[str], points: int, hidden: int, dropout: float):
        super().__init__()
        groups = level_groups(metrics)
        self.points = points
        self.heads = nn.ModuleDict({
            level: nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, len(names) * points))
            for level, names in groups.items()})
        grouped = [m for names in groups.values() for m in names]
        self.register_buffer("order", torch.tensor([grouped.index(m) for m in metrics]), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = torch.cat([head(features).view(features.shape[0], -1, self.points) for head in self.heads.values()], 1)
        return out[:, self.order]


class BiLSTMCurvePredictor(nn.Module):
    """BudgetFusion's predictor: a bidirectional LSTM over the prompt's token embeddings.

    Features: the last forward and first backward hidden states of the top layer and the masked
    mean of its outputs (4 x ``hidden``); padding is packed away, so a prompt's prediction does
    not depend on its batch.
    """

    def __init__(self, text_dim: int, metrics: Sequence[str], points: int, hidden: int = 64, layers: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(text_dim, hidden, num_layers=layers, batch_first=True, bidirectional=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.heads = CurveHeads(4 * hidden, metrics, points, hidden, dropout)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(self.dropout(hidden), lengths, batch_first=True, enforce_sorted=False)
        out, (h_n, _) = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=hidden.shape[1])
        m = mask[..., None].to(out.dtype)
        mean = (out * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.heads(torch.cat([h_n[-2], h_n[-1], mean], dim=-1))


class PooledMLPCurvePredictor(nn.Module):
    """The ablation: an MLP over the pooled sentence embedding only (no token order)."""

    def __init__(self, text_dim: int, metrics: Sequence[str], points: int, hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.trunk = nn.Sequential(nn.Dropout(dropout), nn.Linear(text_dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.heads = CurveHeads(hidden, metrics, points, hidden // 2, dropout)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.heads(self.trunk(pooled))


ARCHITECTURES = {"bilstm": BiLSTMCurvePredictor, "mlp": PooledMLPCurvePredictor}


def build_network(config: dict) -> nn.Module:
    """The network a budget config describes (``architecture``, ``text_dim``, ``metrics``,
    ``step_grid``, and the architecture's own ``network`` kwargs)."""
    arch = config["architecture"]
    if arch not in ARCHITECTURES:
        raise BudgetModelError(f"budget model: unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    points = len(config["step_grid"]) + 1
    return ARCHITECTURES[arch](config["text_dim"], config["metrics"], points, **config.get("network", {}))


def make_config(architecture: str, network: dict, *, text_dim: int, max_text_length: int, step_grid: Sequence[int],
                reference_steps: int, metrics: Sequence[str], rule_metrics: dict[str, str],
                normalizer: TargetNormalizer, model: dict, plateau_epsilon: float = DEFAULT_PLATEAU_EPSILON,
                psnr_cap_db: float = DEFAULT_PSNR_CAP_DB, extra: dict | None = None) -> dict:
    """A budget model config (the module docstring lists what it holds). ``rule_metrics`` maps a
    level to a metric name or prefix; it is resolved against ``metrics`` here."""
    step_grid = [int(s) for s in step_grid]
    if step_grid != sorted(set(step_grid)) or not step_grid or step_grid[0] < 1:
        raise ValueError(f"step_grid: must be increasing positive integers, got {step_grid}")
    rules = {level: resolve_metric(name, metrics) for level, name in rule_metrics.items()}
    return {
        "format": FORMAT, "architecture": architecture, "network": dict(network),
        "text_dim": int(text_dim), "max_text_length": int(max_text_length),
        "step_grid": step_grid, "reference_steps": int(reference_steps),
        "metrics": list(metrics), "levels": level_groups(metrics), "rule_metrics": rules,
        "normalization": normalizer.to_dict(),
        "rules": {"plateau_epsilon": float(plateau_epsilon), "psnr_cap_db": float(psnr_cap_db)},
        "model": dict(model), **(extra or {}),
    }


# ------------------------------------------------------------------------------------------------
# The model being budgeted
# ------------------------------------------------------------------------------------------------
def model_record(model_dir: str | os.PathLike) -> dict:
    """What a budget config stores about the model it was trained for."""
    return {"path": str(model_dir), "unet_sha256": unet_fingerprint(model_dir)}


def text_encoder_of(pipe) -> tuple[nn.Module, Any, int]:
    """(text encoder, tokenizer, max tokens) of a loaded pipeline: the embedded model's (MiniLM,
    ``max_text_length``) or a stock SD / SDXL pipeline's first CLIP encoder."""
    encoder, tokenizer = getattr(pipe, "text_encoder", None), getattr(pipe, "tokenizer", None)
    if encoder is None or tokenizer is None:
        raise BudgetModelError("model: the pipeline has no text_encoder/tokenizer for the budget predictor")
    config = getattr(pipe, "config", {})
    max_length = config.get("max_text_length") if hasattr(config, "get") else None
    return encoder, tokenizer, int(max_length or min(tokenizer.model_max_length, 512) or MAX_TEXT_LENGTH)


# ------------------------------------------------------------------------------------------------
# Curves and the step-choice rules
# ------------------------------------------------------------------------------------------------
@dataclass
class MetricCurves:
    """One prompt's metric curves over the step grid.

    Args:
        step_grid: the step counts, increasing.
        values: {metric: array (len(step_grid),)} in the metric's own units.
        reference: {metric: value at the reference step count} for metrics without reference
            (the quality-target rule divides by it); others are absent or NaN.
        levels: {level: metric} the rules read (``rule_metrics`` of the model config).
        scale: {metric: train-split std}, the plateau rule's normalisation (1.0 where absent).
        prompt_truncated: the prompt was longer than the encoder's limit and was cut.
    """

    step_grid: list[int]
    values: dict[str, np.ndarray]
    levels: dict[str, str]
    reference: dict[str, float] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)
    prompt_truncated: bool = False

    def __post_init__(self):
        self.step_grid = [int(s) for s in self.step_grid]
        self.values = {m: np.asarray(v, dtype=np.float64) for m, v in self.values.items()}
        for level, m in self.levels.items():
            if m not in self.values:
                raise ValueError(f"curves: level {level!r} reads {m!r}, which has no curve")
        for m, v in self.values.items():
            if v.shape != (len(self.step_grid),):
                raise ValueError(f"curves: {m!r} has {v.shape} values for a grid of {len(self.step_grid)}")

    def normalized(self, metric: str) -> np.ndarray:
        """The metric in the plateau rule's units: sign · value / std (higher is better)."""
        return metric_sign(metric) * self.values[metric] / float(self.scale.get(metric, 1.0))

    def to_record(self, decimals: int = 5) -> dict:
        return {"steps": list(self.step_grid),
                "metrics": {m: [round(float(x), decimals) for x in v] for m, v in self.values.items()},
                "reference": {m: round(float(x), decimals) for m, x in self.reference.items() if np.isfinite(x)}}


@dataclass(frozen=True)
class PlateauRule:
    """BudgetFusion's plateau rule (module docstring): ε in train-split standard deviations of
    the metric per extra step."""

    epsilon: float = DEFAULT_PLATEAU_EPSILON
    name = "plateau"

    def __post_init__(self):
        if not np.isfinite(self.epsilon) or self.epsilon < 0:
            raise ValueError(f"epsilon: must be a finite number >= 0, got {self.epsilon}")

    def to_record(self) -> dict:
        return {"name": self.name, "epsilon": self.epsilon}


@dataclass(frozen=True)
class QualityTargetRule:
    """Fewest steps whose predicted quality is at least ``q`` of the reference on every level."""

    q: float
    psnr_cap_db: float = DEFAULT_PSNR_CAP_DB
    name = "quality_target"

    def __post_init__(self):
        if not (np.isfinite(self.q) and 0 < self.q <= 1):
            raise ValueError(f"quality-target: must be in (0, 1], got {self.q}")

    def to_record(self) -> dict:
        return {"name": self.name, "q": self.q, "psnr_cap_db": self.psnr_cap_db}


@dataclass
class StepChoice:
    """The chosen step count and why: each level's own requirement, and whether the rule was met
    on the grid (``reached``; False means the largest grid count was taken as a fallback)."""

    steps: int
    rule: dict
    reached: bool
    per_level: dict[str, int | None]
    note: str | None = None

    def to_record(self) -> dict:
        return {"steps": self.steps, "rule": self.rule, "reached": self.reached, "per_level": self.per_level,
                "note": self.note}


def quality_fraction(metric: str, values: np.ndarray, reference: float | None = None,
                     psnr_cap_db: float = DEFAULT_PSNR_CAP_DB) -> np.ndarray:
    """The metric as a fraction of the reference image's quality (1 = as good as the reference):
    a similarity as it is, 1 − a distance, min(PSNR, cap)/cap, and value / reference value for a
    metric without reference (1 where the reference value is not positive: nothing to reach)."""
    values = np.asarray(values, dtype=np.float64)
    kind = metric_kind(metric)
    if kind == "similarity":
        return values
    if kind == "distance":
        return 1.0 - values
    if kind == "psnr":
        return np.minimum(values, psnr_cap_db) / psnr_cap_db
    if reference is None or not np.isfinite(reference):
        raise ValueError(f"{metric}: a metric without reference needs its reference-step value")
    return values / reference if reference > 0 else np.ones_like(values)


def _first_of_suffix(ok: np.ndarray) -> int | None:
    """Index of the first element from which ``ok`` holds to the end, or None."""
    stays = np.flip(np.logical_and.accumulate(np.flip(ok)))
    return int(np.argmax(stays)) if stays.any() else None


def choose_steps(curves: MetricCurves, rule: PlateauRule | QualityTargetRule) -> StepChoice:
    """Choose a step count on ``curves.step_grid`` by ``rule`` (module docstring), every level in
    ``curves.levels`` considered. Never fails: a rule not met on the grid gives the largest count
    with ``reached = False`` and a note naming the levels."""
    grid = np.asarray(curves.step_grid, dtype=np.float64)
    per_level: dict[str, int | None] = {}
    for level, metric in curves.levels.items():
        if isinstance(rule, PlateauRule):
            gain = np.diff(curves.normalized(metric)) / np.diff(grid)  # per extra step, between grid counts
            ok = np.append(gain < rule.epsilon, True)  # nothing to gain beyond the last count
            ok[-1] = len(gain) == 0 or bool(gain[-1] < rule.epsilon)
        elif isinstance(rule, QualityTargetRule):
            q = quality_fraction(metric, curves.values[metric], curves.reference.get(metric), rule.psnr_cap_db)
            ok = q >= rule.q
        else:
            raise TypeError(f"rule: expected PlateauRule or QualityTargetRule, got {type(rule).__name__}")
        k = _first_of_suffix(ok)
        per_level[level] = None if k is None else curves.step_grid[k]
    missed = [level for level, s in per_level.items() if s is None]
    if missed:
        what = "still gaining >= epsilon per step" if isinstance(rule, PlateauRule) else f"below q = {rule.q}"
        note = f"{', '.join(missed)} {what} at {curves.step_grid[-1]} steps; took the largest grid count"
        return StepChoice(curves.step_grid[-1], rule.to_record(), False, per_level, note)
    return StepChoice(max(per_level.values()), rule.to_record(), True, per_level)


# ------------------------------------------------------------------------------------------------
# The trained predictor: load, save, predict
# ------------------------------------------------------------------------------------------------
class BudgetPredictor:
    """A trained curve predictor and its config (``load_budget_predictor``, ``save``)."""

    def __init__(self, network: nn.Module, config: dict, path: str | os.PathLike | None = None):
        self.network = network.eval()
        self.config = config
        self.path = str(path) if path is not None else None
        self.normalizer = TargetNormalizer.from_dict(config["metrics"], config["normalization"])

    @property
    def step_grid(self) -> list[int]:
        return list(self.config["step_grid"])

    @property
    def metrics(self) -> list[str]:
        return list(self.config["metrics"])

    @property
    def rule_metrics(self) -> dict[str, str]:
        return dict(self.config["rule_metrics"])

    # -- compatibility ----------------------------------------------------------------------
    def _name(self) -> str:
        return f"budget model {self.path!r}" if self.path else "the budget model"

    def check_step_grid(self, step_grid: Sequence[int], what: str = "the step grid") -> None:
        """Raise BudgetModelMismatch naming both grids unless ``step_grid`` is the trained one."""
        if [int(s) for s in step_grid] != self.step_grid:
            raise BudgetModelMismatch(f"{self._name()} predicts step grid {self.step_grid}, but {what} "
                                      f"has {[int(s) for s in step_grid]}; retrain it (dvc repro train_budget)")

    def check_model(self, model_dir: str | os.PathLike) -> None:
        """Raise BudgetModelMismatch naming both models unless ``model_dir``'s UNet files are the
        ones the predictor was trained for (same fingerprint; the path alone may differ)."""
        trained = self.config["model"]
        try:
            found = unet_fingerprint(model_dir)
        except FingerprintError as exc:
            raise BudgetModelError(str(exc)) from None
        if found != trained["unet_sha256"]:
            raise BudgetModelMismatch(
                f"{self._name()} was trained for model {trained['path']!r} (unet {trained['unet_sha256']}), "
                f"not {str(model_dir)!r} (unet {found}); retrain it for this model")

    # -- prediction -------------------------------------------------------------------------
    @torch.no_grad()
    def predict_normalized(self, emb: PromptEmbeddings) -> torch.Tensor:
        """(B, M, P) normalised predictions for encoded prompts."""
        device = next(self.network.parameters()).device
        return self.network(emb.hidden.to(device).float(), emb.mask.to(device), emb.pooled.to(device).float())

    def curves_from_normalized(self, z: torch.Tensor | np.ndarray, truncated: Sequence[bool] | None = None
                               ) -> list[MetricCurves]:
        """MetricCurves (the metrics' own units) from (B, M, P) normalised predictions."""
        z = z.detach().cpu().double().numpy() if torch.is_tensor(z) else np.asarray(z, dtype=np.float64)
        values = self.normalizer.denormalize(z)
        truncated = truncated or [False] * len(values)
        scale = dict(zip(self.metrics, map(float, self.normalizer.std)))
        out = []
        for v, cut in zip(values, truncated):
            reference = {m: float(v[i, -1]) for i, m in enumerate(self.metrics) if metric_kind(m) == "no_reference"}
            out.append(MetricCurves(self.step_grid, {m: v[i, :-1] for i, m in enumerate(self.metrics)},
                                    self.rule_metrics, reference, scale, bool(cut)))
        return out

    def encode(self, prompts: list[str], text_encoder: nn.Module, tokenizer) -> PromptEmbeddings:
        """The prompts' token embeddings from the budgeted model's encoder; prompts over the
        config's ``max_text_length`` tokens are truncated (``PromptEmbeddings.truncated``)."""
        width = getattr(getattr(text_encoder, "config", None), "hidden_size", self.config["text_dim"])
        if width != self.config["text_dim"]:
            raise BudgetModelMismatch(f"{self._name()} reads {self.config['text_dim']}-wide token embeddings, "
                                      f"but this text encoder gives {width}")
        return encode_prompts(prompts, text_encoder, tokenizer, max_length=self.config["max_text_length"])

    def predict(self, prompts: list[str], text_encoder: nn.Module, tokenizer) -> list[MetricCurves]:
        """Each prompt's predicted curves (``MetricCurves``)."""
        emb = self.encode(prompts, text_encoder, tokenizer)
        return self.curves_from_normalized(self.predict_normalized(emb), emb.truncated)

    def save(self, path: str | os.PathLike) -> None:
        save_budget_model(self.network, self.config, path)


def save_budget_model(network: nn.Module, config: dict, path: str | os.PathLike, subdirs: dict | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` to ``path`` atomically (a sibling temp folder
    renamed over it); ``subdirs`` {name: (network, config)} are saved inside it the same way."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in network.state_dict().items()}, str(tmp / WEIGHTS_FILE),
              metadata={"format": FORMAT, "architecture": config["architecture"]})
    for name, (sub_network, sub_config) in (subdirs or {}).items():
        save_budget_model(sub_network, sub_config, tmp / name)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_budget_predictor(path: str | os.PathLike = DEFAULT_BUDGET_DIR, device: str | torch.device = "cpu"
                          ) -> BudgetPredictor:
    """Load a budget model directory (``train_budget`` writes models/budget; its pooled-MLP
    ablation is in ``models/budget/mlp``). Raises BudgetModelError with a one-line reason."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise BudgetModelError(f"budget model: directory {str(path)!r} does not exist (train it: dvc repro train_budget)")
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (path / f).is_file()]
    if missing:
        raise BudgetModelError(f"budget model: {str(path)!r} lacks {', '.join(missing)} (not a budget model directory)")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        if config.get("format") != FORMAT:
            raise BudgetModelError(f"budget model: {str(path / CONFIG_FILE)!r} is not a {FORMAT} config")
        network = build_network(config)
        network.load_state_dict(load_file(str(path / WEIGHTS_FILE), device=str(device)))
    except BudgetModelError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BudgetModelError(f"budget model: cannot load {str(path)!r}: {first}") from None
    return BudgetPredictor(network.to(device), config, path)
