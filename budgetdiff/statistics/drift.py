"""Prompt drift: are the served prompts still drawn from the distribution the budget predictor was
trained on?

The budget predictor (``budgetdiff/methods/budget.py``) reads a prompt through the frozen MiniLM encoder
(``budgetdiff/text.py``); its step choices are only as good as its training prompts are
representative. Drift is tested on the pooled, L2-normalised MiniLM sentence embedding (the masked
mean of the token embeddings that the BiLSTM reads; exactly the input of the pooled-MLP ablation)
of each window of served prompts against the predictor's training prompts, with two tests:

- **Kernel MMD permutation test** (``mmd_permutation_test``): the unbiased estimate of MMD² with a
  Gaussian kernel k(a, b) = exp(-|a - b|² / (2 h²)), h the median pairwise distance of the pooled
  sample (median heuristic) unless given. The p-value is the share of random relabellings of the
  pooled sample whose MMD² is at least the observed one, counted with the observed labelling
  itself: p = (1 + #{perm >= obs}) / (1 + n_permutations), so p >= 1 / (1 + n_permutations) > 0
  and the test is exact (level <= alpha) for any number of permutations.
- **Classifier two-sample test** (``classifier_two_sample_test``): the larger sample is subsampled
  to the size of the smaller one (chance is then 0.5), both are split by class into a training
  and a held-out half, an L2-regularised logistic regression (scikit-learn when installed, else
  the same objective on torch) is fitted on standardised features and scored on the held-out
  half. The statistic is the held-out AUC; its p-value is the one-sided Mann-Whitney test of
  "held-out scores of the second sample rank higher", by the normal approximation with tie and
  continuity corrections. Under no drift the held-out labels are exchangeable given the fitted
  classifier, so the test is valid; an AUC below 0.5 is not evidence of drift (one-sided).

``DriftMonitor`` cuts a stream of prompts into windows and runs both tests on each. A window is
*flagged* when min(p_mmd, p_c2st) < alpha / 2: a Bonferroni correction over the two tests, so
that the chance of flagging a window without drift is at most alpha (default 0.01).

``reference_prompts(params)`` regenerates the budget predictor's training prompts from the code
and params.yaml (the ``prompts`` stage's sampler, seeds and split; ``train_budget.train_split``),
so the drift check needs neither data/ nor DVC. ``drift_report`` writes the self-contained HTML
report behind ``budgetdiff drift PROMPT_LOG --out report.html``.

This module uses torch and numpy only (scikit-learn optional, matplotlib for the report).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

DEFAULT_ALPHA = 0.01          # family-wise, over the two tests (Bonferroni: each test at alpha / 2)
DEFAULT_WINDOW = 100          # served prompts per window
MIN_WINDOW = 10               # the smallest window the tests are run on
DEFAULT_PERMUTATIONS = 999    # MMD permutations: p >= 0.001, well below alpha / 2 = 0.005
DEFAULT_TEST_FRACTION = 0.5   # C2ST held-out share (per class)
DEFAULT_C = 0.1               # C2ST inverse L2 strength (scikit-learn's C), on standardised features
N_TESTS = 2                   # MMD and C2ST: the Bonferroni factor
LOG_SUFFIXES = (".txt", ".jsonl")
C2ST_PVALUE_METHOD = ("one-sided Mann-Whitney test on the held-out scores (normal approximation, "
                      "tie and continuity corrected)")

Embedder = Callable[[list[str]], np.ndarray]


class PromptLogError(ValueError):
    """A prompt log that cannot be used (missing, empty, unknown format)."""


class ReportWriteError(ValueError):
    """The HTML report cannot be written where asked."""


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------
def _as_matrix(a: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a, dtype=np.float64) if not isinstance(a, torch.Tensor) else a)
    t = t.detach().to("cpu", torch.float64)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a (n, d) array, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return t


def _pair(x: Any, y: Any, min_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_matrix(x, "x"), _as_matrix(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x, y: different dimensions ({x.shape[1]} and {y.shape[1]})")
    for name, t in (("x", x), ("y", y)):
        if t.shape[0] < min_n:
            raise ValueError(f"{name}: needs at least {min_n} samples, got {t.shape[0]}")
    return x, y


def median_bandwidth(z: Any) -> float:
    """The median heuristic: the median Euclidean distance over distinct pairs of rows of ``z``
    (the mean of the non-zero distances when over half are zero; 1.0 when all rows coincide)."""
    z = _as_matrix(z, "z")
    d = torch.cdist(z, z)
    iu = torch.triu_indices(len(z), len(z), offset=1)
    pairs = d[iu[0], iu[1]]
    if pairs.numel() == 0:
        return 1.0
    h = float(np.median(pairs.numpy()))  # the usual median (mean of the middle two), as numpy computes it
    if h > 0:
        return h
    nonzero = pairs[pairs > 0]
    return float(nonzero.mean()) if nonzero.numel() else 1.0


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """k(a, b) = exp(-|a - b|² / (2 h²))."""
    return torch.exp(-torch.cdist(a, b).pow(2) / (2.0 * bandwidth ** 2))


def _mmd2_from_kernel(k0: torch.Tensor, in_x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Unbiased MMD² for each row of ``in_x`` ((P, N) 0/1: which pooled points form x), from the
    pooled kernel matrix ``k0`` with a zero diagonal."""
    in_y = 1.0 - in_x
    kx, ky = in_x @ k0, in_y @ k0
    sxx, syy, sxy = (kx * in_x).sum(1), (ky * in_y).sum(1), (kx * in_y).sum(1)
    return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2.0 * sxy / (n * m)


@dataclass(frozen=True)
class MMDResult:
    statistic: float        # unbiased MMD² (may be slightly negative without drift)
    p_value: float          # (1 + #perm >= obs) / (1 + n_permutations)
    bandwidth: float        # Gaussian kernel h
    n_x: int
    n_y: int
    n_permutations: int

    def to_record(self) -> dict:
        return asdict(self)


def mmd_permutation_test(x: Any, y: Any, n_permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0,
                         bandwidth: float | None = None) -> MMDResult:
    """Kernel two-sample test of "x and y come from the same distribution" (module docstring).

    Args:
        x, y: (n, d) and (m, d) samples (numpy arrays, tensors or nested lists), n, m >= 2.
        n_permutations: random relabellings of the pooled sample (>= 1).
        seed: seeds the permutations.
        bandwidth: the Gaussian kernel's h; None: the median heuristic on the pooled sample.

    Memory and time are O((n + m)²) and O(n_permutations (n + m)²).
    """
    x, y = _pair(x, y, 2)
    if int(n_permutations) < 1:
        raise ValueError(f"n_permutations: must be >= 1, got {n_permutations}")
    n_permutations = int(n_permutations)
    z = torch.cat([x, y])
    if bandwidth is None:
        bandwidth = median_bandwidth(z)
    elif not (math.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"bandwidth: must be a positive number, got {bandwidth}")
    n, m = len(x), len(y)
    k0 = gaussian_kernel(z, z, float(bandwidth))
    k0.fill_diagonal_(0.0)
    labels = torch.cat([torch.ones(n, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)])
    observed = float(_mmd2_from_kernel(k0, labels[None], n, m)[0])
    gen = torch.Generator().manual_seed(int(seed))
    tol = 1e-12 * max(1.0, abs(observed))  # relabellings equal to the observed one up to rounding count
    hits, done = 0, 0
    while done < n_permutations:
        chunk = min(256, n_permutations - done)
        perms = torch.stack([torch.randperm(n + m, generator=gen) for _ in range(chunk)])
        stats = _mmd2_from_kernel(k0, labels[perms], n, m)
        hits += int((stats >= observed - tol).sum())
        done += chunk
    return MMDResult(statistic=observed, p_value=(1 + hits) / (1 + n_permutations), bandwidth=float(bandwidth),
                     n_x=n, n_y=m, n_permutations=n_permutations)


def auc_score(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` for ``labels`` (1 positive), ties counted one half (Mann-Whitney U)."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    n1, n0 = int(labels.sum()), int((~labels).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError("labels: need both classes")
    ranks = _average_ranks(scores)
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _average_ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    ranks = np.empty(len(a), dtype=np.float64)
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def mann_whitney_pvalue(labels: np.ndarray, scores: np.ndarray) -> float:
    """One-sided p-value of "positives score higher than negatives": normal approximation of
    the Mann-Whitney U statistic with tie and continuity corrections; in (0, 1]."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    n1, n0 = int(labels.sum()), int((~labels).sum())
    n = n1 + n0
    u = auc_score(labels, scores) * n1 * n0
    _, counts = np.unique(scores, return_counts=True)
    ties = float(((counts.astype(np.float64) ** 3) - counts).sum())
    var = n1 * n0 / 12.0 * ((n + 1) - ties / (n * (n - 1)))
    if var <= 0:
        return 1.0  # every score tied: no evidence either way
    zscore = (u - n1 * n0 / 2.0 - 0.5) / math.sqrt(var)
    return min(1.0, max(0.5 * math.erfc(zscore / math.sqrt(2.0)), sys.float_info.min))


def _sklearn_available() -> bool:
    try:
        import sklearn.linear_model  # noqa: F401
    except ImportError:
        return False
    return True


def _fit_logistic_torch(x: torch.Tensor, y: torch.Tensor, c: float, max_iter: int = 100
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's L2 logistic regression objective, sum(logloss) + |w|² / (2C) (intercept not
    penalised), minimised by Newton's method with a backtracking line search (exact for the small
    dimensions here: one (d+1)² solve per step, about ten steps)."""
    n, d = x.shape
    design = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    reg = torch.full((d + 1,), 1.0 / c, dtype=x.dtype)
    reg[-1] = 0.0
    beta = torch.zeros(d + 1, dtype=x.dtype)

    def objective(b):
        z = design @ b
        return (torch.nn.functional.softplus(z) - y * z).sum() + 0.5 * (reg * b * b).sum()

    value = objective(beta)
    eye = torch.eye(d + 1, dtype=x.dtype)
    for _ in range(max_iter):
        p = torch.sigmoid(design @ beta)
        grad = design.T @ (p - y) + reg * beta
        if float(grad.abs().max()) < 1e-9 * max(1.0, n):
            break
        hess = (design.T * (p * (1 - p))) @ design + torch.diag(reg) + 1e-10 * eye
        step = torch.linalg.solve(hess, grad)
        t, decrease = 1.0, float(grad @ step)
        while True:
            candidate = beta - t * step
            new_value = objective(candidate)
            if float(new_value) <= float(value) - 1e-4 * t * decrease or t < 1e-10:
                break
            t *= 0.5
        if float(value - new_value) <= 1e-14 * max(1.0, abs(float(value))):
            beta, value = candidate, new_value
            break
        beta, value = candidate, new_value
    return beta[:-1], beta[-1]


@dataclass(frozen=True)
class C2STResult:
    auc: float              # held-out ROC AUC (0.5: the classifier cannot tell the samples apart)
    p_value: float          # C2ST_PVALUE_METHOD
    accuracy: float         # held-out accuracy at the 0.5 probability threshold
    n_per_class: int        # after balancing
    n_train: int
    n_test: int
    backend: str            # sklearn | torch
    method: str = C2ST_PVALUE_METHOD

    def to_record(self) -> dict:
        return asdict(self)


def classifier_two_sample_test(x: Any, y: Any, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION,
                               c: float = DEFAULT_C, backend: str = "auto") -> C2STResult:
    """Classifier two-sample test (module docstring): can a logistic regression tell y from x on
    held-out data?

    Args:
        x, y: (n, d) and (m, d) samples; the larger is subsampled to the smaller's size.
        seed: seeds the subsampling and the split.
        test_fraction: share of each class held out for scoring (0 < f < 1).
        c: inverse L2 strength (scikit-learn's ``C``) on standardised features.
        backend: ``sklearn``, ``torch`` or ``auto`` (scikit-learn when installed).
    """
    x, y = _pair(x, y, 4)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction: must be in (0, 1), got {test_fraction}")
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"c: must be a positive number, got {c}")
    if backend not in ("auto", "sklearn", "torch"):
        raise ValueError(f"backend: must be auto, sklearn or torch, got {backend!r}")
    if backend == "auto":
        backend = "sklearn" if _sklearn_available() else "torch"
    rng = np.random.default_rng(int(seed))
    k = min(len(x), len(y))
    n_test = min(k - 2, max(2, int(round(k * test_fraction))))
    train_idx, test_idx = [], []
    for cls, sample in ((0, x), (1, y)):
        chosen = rng.permutation(len(sample))[:k]
        test_idx.append((cls, sample[chosen[:n_test]]))
        train_idx.append((cls, sample[chosen[n_test:]]))
    xtr = torch.cat([s for _, s in train_idx]).numpy()
    ytr = np.concatenate([np.full(len(s), cls) for cls, s in train_idx])
    xte = torch.cat([s for _, s in test_idx]).numpy()
    yte = np.concatenate([np.full(len(s), cls) for cls, s in test_idx])
    mean, std = xtr.mean(0), xtr.std(0)
    std = np.where(std > 1e-12 * max(1.0, float(np.abs(xtr).max())), std, 1.0)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    if backend == "sklearn":
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=c, max_iter=2000, tol=1e-6)
        clf.fit(xtr, ytr)
        scores = clf.decision_function(xte)
    else:
        w, b = _fit_logistic_torch(torch.from_numpy(xtr), torch.from_numpy(ytr.astype(np.float64)), c)
        scores = (torch.from_numpy(xte) @ w + b).numpy()
    return C2STResult(auc=auc_score(yte, scores), p_value=mann_whitney_pvalue(yte, scores),
                      accuracy=float(((scores > 0) == yte.astype(bool)).mean()), n_per_class=k,
                      n_train=len(ytr), n_test=len(yte), backend=backend)


# ------------------------------------------------------------------------------------------------
# Embeddings
# ------------------------------------------------------------------------------------------------
class MiniLMEmbedder:
    """Prompts -> (N, 384) float32 pooled MiniLM sentence embeddings (masked mean, L2-normalised),
    as ``budgetdiff.text.encode_prompts`` computes them for the budget predictor. The encoder is
    loaded on first use (or passed in, e.g. the served pipeline's own ``text_encoder``)."""

    def __init__(self, text_encoder=None, tokenizer=None, batch_size: int = 64, progress: bool = False,
                 max_length: int | None = None):
        self._encoder, self._tokenizer = text_encoder, tokenizer
        self.batch_size, self.progress, self.max_length = int(batch_size), progress, max_length
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._encoder is None or self._tokenizer is None:
                from budgetdiff.text import load_minilm

                self._encoder, self._tokenizer = load_minilm()
        return self._encoder, self._tokenizer

    def __call__(self, prompts: list[str]) -> np.ndarray:
        from budgetdiff.text import MAX_TEXT_LENGTH, encode_prompts

        prompts = list(prompts)
        if not prompts:
            return np.zeros((0, 0), dtype=np.float32)
        encoder, tokenizer = self._load()
        starts = range(0, len(prompts), self.batch_size)
        if self.progress and len(prompts) > self.batch_size:
            from tqdm import tqdm

            starts = tqdm(starts, desc="embedding", unit="batch", file=sys.stderr, disable=None)
        chunks = [encode_prompts(prompts[i:i + self.batch_size], encoder, tokenizer,
                                 max_length=self.max_length or MAX_TEXT_LENGTH).pooled.float().cpu().numpy()
                  for i in starts]
        return np.concatenate(chunks)


def default_embedder(progress: bool = False) -> Embedder:
    """The embedding the drift checks use unless told otherwise (tests replace it)."""
    return MiniLMEmbedder(progress=progress)


# ------------------------------------------------------------------------------------------------
# The budget predictor's training prompts
# ------------------------------------------------------------------------------------------------
def _load_params(params: Mapping | str | os.PathLike) -> Mapping:
    if isinstance(params, Mapping):
        return params
    import yaml

    path = Path(params)
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"params: {path} does not exist (run from the repository root or pass its path)") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"params: cannot read {path} ({str(exc).splitlines()[0]})") from None
    if not isinstance(loaded, Mapping):
        raise ValueError(f"params: {path} is not a YAML mapping")
    return loaded


def prompt_table(params: Mapping | str | os.PathLike = "params.yaml") -> list[dict]:
    """The ``prompts`` stage's table (data/prompts.parquet) regenerated from code and params
    (``budgetdiff.domain.prompt_table``, the stage's own definition): rows prompt_id, prompt, seed,
    complexity, split, in the stage's order."""
    from budgetdiff.domain.prompt_table import prompt_rows

    cfg = _load_params(params).get("prompts")
    if not isinstance(cfg, Mapping):
        raise ValueError("params: no 'prompts' section")
    return prompt_rows(cfg)[0]


def reference_prompts(params: Mapping | str | os.PathLike = "params.yaml", split: str | None = None) -> list[str]:
    """The budget predictor's training prompts: the ``prompts`` stage's rows of split
    ``train_budget.train_split`` (default ``train``), regenerated deterministically from the scene
    sampler and the params' seeds (``prompt_table``), in prompt_id order. With the repository's
    params: 128 prompts (32 per object count), seeds 61M-64M."""
    loaded = _load_params(params)
    split = split or (loaded.get("train_budget") or {}).get("train_split", "train")
    prompts = [r["prompt"] for r in prompt_table(loaded) if r["split"] == split]
    if not prompts:
        raise ValueError(f"params: split {split!r} of the prompts stage has no prompts")
    return prompts


# ------------------------------------------------------------------------------------------------
# Windows of served prompts
# ------------------------------------------------------------------------------------------------
@dataclass
class DriftResult:
    """Both tests on one window of served prompts against the reference."""

    window_index: int
    n_prompts: int
    n_reference: int
    mmd: MMDResult
    c2st: C2STResult
    alpha: float = DEFAULT_ALPHA
    seconds: float = 0.0

    @property
    def threshold(self) -> float:
        """Each test's level: alpha / 2 (Bonferroni over the two tests)."""
        return self.alpha / N_TESTS

    @property
    def p_value(self) -> float:
        """The Bonferroni-adjusted p-value of the window: min(1, 2 min(p_mmd, p_c2st))."""
        return min(1.0, N_TESTS * min(self.mmd.p_value, self.c2st.p_value))

    @property
    def flagged(self) -> bool:
        return self.p_value < self.alpha

    def to_record(self) -> dict:
        return {"window": self.window_index, "prompts": self.n_prompts, "reference_prompts": self.n_reference,
                "mmd_statistic": self.mmd.statistic, "mmd_pvalue": self.mmd.p_value,
                "mmd_bandwidth": self.mmd.bandwidth,
                "n_permutations": self.mmd.n_permutations, "c2st_auc": self.c2st.auc, "c2st_pvalue": self.c2st.p_value,
                "c2st_accuracy": self.c2st.accuracy, "p_value": self.p_value, "alpha": self.alpha,
                "correction": "bonferroni", "flagged": self.flagged, "seconds": round(self.seconds, 4)}


def _check_window(window: int) -> int:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < MIN_WINDOW:
        raise ValueError(f"window: must be an integer >= {MIN_WINDOW}, got {window!r}")
    return int(window)


def _check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise ValueError(f"alpha: must be in (0, 1), got {alpha!r}")
    return float(alpha)


class DriftMonitor:
    """Holds the reference embeddings; cuts served prompts into windows of ``window`` and tests
    each (``add``), or tests one given window (``test``).

    Args:
        reference: reference prompts (embedded with ``embed``) or their (n, d) embeddings.
        embed: prompts -> (N, d) array; default ``default_embedder()`` (pooled MiniLM).
        window: prompts per window (>= MIN_WINDOW).
        alpha: family-wise level; a window is flagged when min(p_mmd, p_c2st) < alpha / 2.
        n_permutations: MMD permutations.
        seed: window i's permutations and C2ST split use seed + i.
    """

    def __init__(self, reference: Sequence[str] | np.ndarray | torch.Tensor, *, embed: Embedder | None = None,
                 window: int = DEFAULT_WINDOW, alpha: float = DEFAULT_ALPHA,
                 n_permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0,
                 test_fraction: float = DEFAULT_TEST_FRACTION, c: float = DEFAULT_C, backend: str = "auto"):
        self.window, self.alpha = _check_window(window), _check_alpha(alpha)
        if int(n_permutations) < 1:
            raise ValueError(f"n_permutations: must be >= 1, got {n_permutations}")
        self.n_permutations, self.seed = int(n_permutations), int(seed)
        self.test_fraction, self.c, self.backend = test_fraction, c, backend
        self._embed = embed
        if len(reference) and isinstance(reference[0], str):
            self.reference_prompts: list[str] | None = list(reference)
            self.reference = self._as_embeddings(self.embed(self.reference_prompts), "reference")
        else:
            self.reference_prompts = None
            self.reference = self._as_embeddings(reference, "reference")
        if len(self.reference) < 4:
            raise ValueError(f"reference: needs at least 4 prompts, got {len(self.reference)}")
        self._pending: list[str] = []
        self.results: list[DriftResult] = []

    @staticmethod
    def _as_embeddings(a, name: str) -> np.ndarray:
        a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
        if a.ndim != 2 or not np.isfinite(a).all():
            raise ValueError(f"{name}: expected a finite (n, d) embedding array, got shape {a.shape}")
        return a

    def embed(self, prompts: list[str]) -> np.ndarray:
        if self._embed is None:
            self._embed = default_embedder()
        return self._embed(list(prompts))

    @property
    def pending(self) -> int:
        """Prompts added and not yet part of a tested window."""
        return len(self._pending)

    def add(self, prompts: str | Iterable[str]) -> list[DriftResult]:
        """Add served prompts; every complete window of ``window`` is tested (in order) and its
        result returned (and appended to ``results``)."""
        self._pending.extend([prompts] if isinstance(prompts, str) else list(prompts))
        out = []
        while len(self._pending) >= self.window:
            chunk, self._pending = self._pending[:self.window], self._pending[self.window:]
            out.append(self.test(chunk))
        return out

    def test(self, window: Sequence[str] | np.ndarray, window_index: int | None = None) -> DriftResult:
        """Both tests on one window (prompts, or their embeddings), whatever its size (>= 4)."""
        t0 = time.perf_counter()
        index = len(self.results) if window_index is None else int(window_index)
        if len(window) and isinstance(window[0], str):
            emb = self._as_embeddings(self.embed(list(window)), "window")
        else:
            emb = self._as_embeddings(window, "window")
        if emb.shape[1] != self.reference.shape[1]:
            raise ValueError(f"window: embeddings of width {emb.shape[1]}, the reference's are {self.reference.shape[1]}")
        seed = self.seed + index
        mmd = mmd_permutation_test(self.reference, emb, n_permutations=self.n_permutations, seed=seed)
        c2st = classifier_two_sample_test(self.reference, emb, seed=seed, test_fraction=self.test_fraction,
                                          c=self.c, backend=self.backend)
        result = DriftResult(window_index=index, n_prompts=len(emb), n_reference=len(self.reference), mmd=mmd,
                             c2st=c2st, alpha=self.alpha, seconds=time.perf_counter() - t0)
        if window_index is None:
            self.results.append(result)
        return result


def window_slices(n: int, window: int, min_window: int = MIN_WINDOW) -> list[slice]:
    """Consecutive windows of ``window`` prompts over ``n``; a shorter last window is kept when it
    has at least ``min_window`` prompts (so a log shorter than ``window`` is one window), else
    left out. Raises ValueError when there are fewer than ``min_window`` prompts."""
    window = _check_window(window)
    if n < min_window:
        raise ValueError(f"prompts: {n} prompt(s), the drift tests need at least {min_window}")
    slices = [slice(i, i + window) for i in range(0, n - n % window, window)]
    if n % window >= min_window:
        slices.append(slice(n - n % window, n))
    return slices


# ------------------------------------------------------------------------------------------------
# Prompt logs
# ------------------------------------------------------------------------------------------------
def read_prompt_log(path: str | os.PathLike) -> tuple[list[str], int]:
    """The prompts of a served-prompt log, in order, duplicates kept (they are traffic), and the
    number of lines skipped. ``.txt``: one prompt per line, blank lines skipped. ``.jsonl``: one
    JSON object per line with a string ``prompt`` (``budgetdiff batch`` records, server logs);
    lines that are not such an object are skipped and counted.

    Raises:
        PromptLogError: a missing or unreadable file, an unknown extension, no prompt at all.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in LOG_SUFFIXES:
        raise PromptLogError(f"{p}: unknown extension {p.suffix or '(none)'!r}; use {' or '.join(LOG_SUFFIXES)}")
    if p.is_dir():
        raise PromptLogError(f"{p} is a directory")
    try:
        text = p.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        raise PromptLogError(f"{p} does not exist") from None
    except OSError as exc:
        raise PromptLogError(f"cannot read {p} ({exc.strerror or exc})") from None
    prompts, skipped = [], 0
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if suffix == ".txt":
            prompts.append(" ".join(line.split()))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if isinstance(prompt, str) and prompt.strip():
            prompts.append(" ".join(prompt.split()))
        else:
            skipped += 1
    if not prompts:
        raise PromptLogError(f"{p} has no prompt" + (f" ({skipped} line(s) without a 'prompt' string)" if skipped else ""))
    return prompts, skipped


# ------------------------------------------------------------------------------------------------
# The HTML report
# ------------------------------------------------------------------------------------------------
def _png_data_uri(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pvalue_plot(records: list[dict], alpha: float) -> str:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.5, 3.2))
    ax = fig.add_subplot()
    idx = [r["window"] for r in records]
    ax.plot(idx, [r["mmd_pvalue"] for r in records], "o-", label="MMD permutation p")
    ax.plot(idx, [r["c2st_pvalue"] for r in records], "s-", label="C2ST p")
    ax.axhline(alpha / N_TESTS, color="red", ls="--", label=f"alpha/{N_TESTS} = {alpha / N_TESTS:g} (flag below)")
    floor = 1.0 / (1 + records[0]["n_permutations"])
    ax.axhline(floor, color="tab:blue", ls=":", lw=1, label=f"smallest MMD p = 1/(1+permutations) = {floor:.2g}")
    ax.set_yscale("log")
    ax.set_ylim(top=1.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("window")
    ax.set_ylabel("p-value")
    ax.set_title("Drift p-values per window")
    ax.legend(fontsize=8, loc="lower left")
    return _png_data_uri(fig)


def _auc_plot(records: list[dict]) -> str:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.5, 3.0))
    ax = fig.add_subplot()
    ax.plot([r["window"] for r in records], [r["c2st_auc"] for r in records], "o-", color="tab:purple")
    ax.axhline(0.5, color="gray", ls="--", label="chance (0.5)")
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("window")
    ax.set_ylabel("held-out AUC")
    ax.set_title("Classifier two-sample test AUC per window")
    ax.legend(fontsize=8)
    return _png_data_uri(fig)


def pca_2d(*arrays: np.ndarray) -> list[np.ndarray]:
    """Project the arrays on the first two principal components of their union."""
    z = np.concatenate(arrays)
    z = z - z.mean(0)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    proj = z @ vt[:2].T
    if proj.shape[1] < 2:
        proj = np.pad(proj, ((0, 0), (0, 2 - proj.shape[1])))
    out, start = [], 0
    for a in arrays:
        out.append(proj[start:start + len(a)])
        start += len(a)
    return out


def _pca_plot(reference: np.ndarray, served: np.ndarray, flagged_mask: np.ndarray) -> str:
    from matplotlib.figure import Figure

    ref2, srv2 = pca_2d(reference, served)
    fig = Figure(figsize=(6.0, 5.0))
    ax = fig.add_subplot()
    ax.scatter(ref2[:, 0], ref2[:, 1], s=14, alpha=0.6, label=f"reference ({len(reference)})", color="tab:blue")
    ok = ~flagged_mask
    if ok.any():
        ax.scatter(srv2[ok, 0], srv2[ok, 1], s=14, alpha=0.6, marker="x", color="tab:green",
                   label=f"served, unflagged windows ({int(ok.sum())})")
    if flagged_mask.any():
        ax.scatter(srv2[flagged_mask, 0], srv2[flagged_mask, 1], s=14, alpha=0.6, marker="x", color="tab:red",
                   label=f"served, flagged windows ({int(flagged_mask.sum())})")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("Prompt embeddings: 2-D PCA of reference and served")
    ax.legend(fontsize=8)
    return _png_data_uri(fig)


def nearest_reference(served: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest reference row, its cosine similarity) for each served row."""
    def unit(a):
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    sim = unit(served) @ unit(reference).T
    idx = sim.argmax(1)
    return idx, sim[np.arange(len(served)), idx]


def _reference_self_similarity(reference: np.ndarray) -> float:
    """Median cosine similarity of each reference prompt to its nearest other reference prompt."""
    u = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    return float(np.median(sim.max(1)))


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
td.t{text-align:left}tr.flag{background:#fde2e2}.ok{color:#17702b}.bad{color:#b00020}img{max-width:100%}
code{background:#f3f3f3;padding:1px 4px}"""


def render_report_html(summary: dict, records: list[dict], plots: dict[str, str], outliers: list[dict]) -> str:
    e = html.escape
    verdict = (f"<p class='bad'><b>Drift: {summary['flagged_windows']} of {summary['windows']} window(s) flagged."
               "</b></p>" if summary["drift"] else
               f"<p class='ok'><b>No drift: none of {summary['windows']} window(s) flagged.</b></p>")
    rows = "".join(
        f"<tr class='{'flag' if r['flagged'] else ''}'><td>{r['window']}</td><td>{r['first_line']}-{r['last_line']}</td>"
        f"<td>{r['prompts']}</td><td>{r['mmd_statistic']:.5f}</td><td>{r['mmd_pvalue']:.4g}</td>"
        f"<td>{r['c2st_auc']:.3f}</td><td>{r['c2st_pvalue']:.3g}</td><td>{r['p_value']:.3g}</td>"
        f"<td>{'yes' if r['flagged'] else 'no'}</td></tr>" for r in records)
    out_rows = "".join(
        f"<tr><td>{o['similarity']:.3f}</td><td class='t'>{e(o['prompt'])}</td><td class='t'>{e(o['nearest_reference'])}</td>"
        f"<td>{o['window']}</td></tr>" for o in outliers)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>budgetdiff prompt drift report</title><style>{_CSS}</style></head>
<body>
<h1>Prompt drift report</h1>
{verdict}
<p>Served prompts: <b>{summary['prompts']}</b> from <code>{e(str(summary['prompt_log']))}</code> in
{summary['windows']} window(s) of up to {summary['window']} ({summary['left_over']} trailing prompt(s) left out);
reference: <b>{summary['reference_prompts']}</b> prompts ({e(summary['reference_source'])}).</p>
<p>Each window is compared with the reference on pooled MiniLM sentence embeddings by a Gaussian-kernel MMD
permutation test ({summary['n_permutations']} permutations, median-heuristic bandwidth) and a classifier two-sample
test (logistic regression, held-out AUC; p-value: {e(C2ST_PVALUE_METHOD)}). A window is flagged when
min(p<sub>MMD</sub>, p<sub>C2ST</sub>) &lt; alpha/2 = {summary['alpha'] / N_TESTS:g} (alpha = {summary['alpha']:g},
Bonferroni over the two tests): without drift, at most a share alpha of windows is flagged.</p>
<h2>p-values</h2><img alt="p-values per window" src="{plots['pvalues']}">
<h2>Classifier AUC</h2><img alt="AUC per window" src="{plots['auc']}">
<h2>Embeddings</h2><img alt="PCA of reference and served embeddings" src="{plots['pca']}">
<h2>Windows</h2>
<table><tr><th>window</th><th>prompts (log order)</th><th>n</th><th>MMD²</th><th>MMD p</th><th>C2ST AUC</th>
<th>C2ST p</th><th>adjusted p</th><th>flagged</th></tr>{rows}</table>
<h2>Most out-of-distribution served prompts</h2>
<p>Served prompts with the lowest cosine similarity to their nearest reference prompt (for scale: a reference
prompt's median similarity to its nearest other reference prompt is {summary['reference_nn_similarity']:.3f}).</p>
<table><tr><th>similarity</th><th>served prompt</th><th>nearest reference prompt</th><th>window</th></tr>{out_rows}</table>
<p style="font-size:12px;color:#666">budgetdiff drift, {e(time.strftime('%Y-%m-%d %H:%M:%S'))}; seed {summary['seed']}.</p>
</body></html>
"""


def drift_report(prompts: Sequence[str], reference: Sequence[str], out_html: str | os.PathLike, *,
                 window: int = DEFAULT_WINDOW, alpha: float = DEFAULT_ALPHA,
                 n_permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0, embed: Embedder | None = None,
                 top_k: int = 10, prompt_log: str = "", reference_source: str = "") -> dict:
    """Test ``prompts`` (served, in order) window by window against ``reference`` and write a
    self-contained HTML report to ``out_html`` (atomically). Returns the summary record."""
    from budgetdiff.io import atomic_write_bytes

    t0 = time.perf_counter()
    window, alpha = _check_window(window), _check_alpha(alpha)
    slices = window_slices(len(prompts), window)
    embed = embed or default_embedder(progress=True)
    ref_emb = np.asarray(embed(list(reference)), dtype=np.float64)
    used = slices[-1].stop
    served_emb = np.asarray(embed(list(prompts[:used])), dtype=np.float64)
    monitor = DriftMonitor(ref_emb, embed=embed, window=window, alpha=alpha, n_permutations=n_permutations, seed=seed)
    records, flagged_mask = [], np.zeros(used, dtype=bool)
    for i, s in enumerate(slices):
        result = monitor.test(served_emb[s])
        records.append({**result.to_record(), "first_line": s.start + 1, "last_line": min(s.stop, used)})
        flagged_mask[s] = result.flagged
    nearest, similarity = nearest_reference(served_emb, ref_emb)
    window_of = np.zeros(used, dtype=int)
    for i, s in enumerate(slices):
        window_of[s] = i
    outliers, seen = [], set()
    for j in np.argsort(similarity, kind="stable"):
        if prompts[j] in seen:
            continue
        seen.add(prompts[j])
        outliers.append({"prompt": prompts[j], "similarity": float(similarity[j]),
                         "nearest_reference": reference[int(nearest[j])], "window": int(window_of[j])})
        if len(outliers) >= top_k:
            break
    flagged = sum(r["flagged"] for r in records)
    summary = {
        "prompts": len(prompts), "windows": len(records), "window": window, "left_over": len(prompts) - used,
        "reference_prompts": len(reference), "alpha": alpha, "correction": "bonferroni",
        "n_permutations": int(n_permutations), "seed": int(seed), "flagged_windows": int(flagged),
        "flagged_fraction": round(flagged / len(records), 4), "drift": bool(flagged),
        "min_mmd_pvalue": min(r["mmd_pvalue"] for r in records),
        "min_c2st_pvalue": min(r["c2st_pvalue"] for r in records),
        "max_c2st_auc": max(r["c2st_auc"] for r in records),
        "reference_nn_similarity": round(_reference_self_similarity(ref_emb), 4),
        "prompt_log": prompt_log, "reference_source": reference_source or "given",
    }
    plots = {"pvalues": _pvalue_plot(records, alpha), "auc": _auc_plot(records),
             "pca": _pca_plot(ref_emb, served_emb, flagged_mask)}
    page = render_report_html(summary, records, plots, outliers)
    try:
        atomic_write_bytes(out_html, page.encode("utf-8"))
        os.chmod(out_html, 0o644)  # a report, not a secret (the temporary file was created 0600)
    except OSError as exc:
        raise ReportWriteError(f"cannot write {out_html} ({exc.strerror or exc})") from None
    summary.update(report=str(out_html), seconds=round(time.perf_counter() - t0, 3),
                   most_out_of_distribution=outliers[0]["prompt"] if outliers else None)
    return summary
