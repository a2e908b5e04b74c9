"""Realised quality, and what each mode promises for ``quality_target``: one definition each.

**Realised quality of an image** is the lowest of its similarity levels against the reference
image (the same prompt, seed, scheduler and guidance at the reference steps, 50 by default)::

    q = min(pixel/ssim, 1 - mid/lpips*, high/iclip*)

over the levels that were measured for that image. A level that is absent, or not a finite number
for that image, is left out of its minimum (so an image that lacks its I-CLIP is judged by SSIM and
LPIPS); an image with no finite level has no realised quality (NaN), and the aggregates below count
it as an image that missed any target. The same function takes one image's levels (floats) or a
set of images' levels (arrays, one value per image), and the mean levels of a set of images.

Aggregated over a set of images:

- ``mean_quality(q)``: the mean of the per-image values (images without one left out);
- ``share_reaching(q, target)``: the share of images with q >= target (NaN counts as a miss), with
  ``coverage_held`` its one-sided Wilson test against a promised share;
- ``conformal_lower_bound(q, c)``: the split-conformal bound a new image reaches with probability
  >= c (NaN counts as -inf: a miss).

**What ``quality_target`` promises, per mode** (``QUALITY_PROMISES``; records and docs use these names):

- ``auto`` - ``coverage``: the calibrated auto policy runs the cheapest plan whose conformal lower
  bound at its ``coverage`` (0.95) reaches q, so >= 95 % of requests like the calibration ones get
  an image of realised quality >= q;
- ``adaptive`` - ``mean``: the skip policy's point whose measured quality reaches q; a point's
  measured quality is the realised quality of its mean levels over the prompts it was measured on,
  so q is met on average (by the level means), not per request;
- ``budget`` - ``predicted_fraction``: the fewest steps at which the budget predictor's predicted
  curve of every level reaches fraction q of its full-step value for this prompt: a prediction,
  not a measurement.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

QUALITY_LEVELS = ("pixel/ssim", "mid/lpips", "high/iclip")  # metric-name prefixes; LPIPS enters as 1 - value
DEFINITION = "the lowest of pixel/ssim, 1 - mid/lpips and high/iclip against the reference (full-step) image"

QUALITY_PROMISES = {
    "auto": "coverage",
    "adaptive": "mean",
    "budget": "predicted_fraction",
}
PROMISE_TEXT = {
    "coverage": "realised quality >= quality_target for at least the auto policy's coverage (95 %) of requests",
    "mean": "the skip point's measured quality (realised quality of its mean levels) >= quality_target",
    "predicted_fraction": "every level's predicted fraction of its full-step value >= quality_target at the "
                          "chosen steps (a prediction)",
}


class QualityError(ValueError):
    """Nothing to judge quality by: no pixel/ssim, mid/lpips* or high/iclip* level."""


def quality_promise(mode: str) -> dict | None:
    """What ``quality_target`` means in ``mode``: {"promise", "means"}; None for modes without one."""
    promise = QUALITY_PROMISES.get(mode)
    return None if promise is None else {"promise": promise, "means": PROMISE_TEXT[promise]}


def _level(name: str) -> str | None:
    for prefix in QUALITY_LEVELS:
        if name.startswith(prefix):
            return prefix
    return None


def realised_quality(levels: Mapping[str, object]):
    """The realised quality (module docstring) of one image (``levels``: metric name -> float) or
    of several (metric name -> per-image values): a float, or an array of one value per image.
    Names other than the quality levels are ignored. Raises QualityError when no level is named."""
    parts, scalar = [], True
    for name, value in levels.items():
        level = _level(name)
        if level is None or value is None:
            continue
        v = np.asarray(value, dtype=float)
        scalar = scalar and v.ndim == 0
        parts.append(1.0 - v if level == "mid/lpips" else v)
    if not parts:
        raise QualityError("quality: no pixel/ssim, mid/lpips* or high/iclip* level to judge by")
    stacked = np.stack(np.broadcast_arrays(*parts))
    finite = np.isfinite(stacked)
    lowest = np.where(finite, stacked, np.inf).min(axis=0)
    out = np.where(finite.any(axis=0), lowest, np.nan)
    return float(out) if scalar else out


def mean_quality(quality) -> float:
    """The mean realised quality of a set of images (those without one left out; NaN if none has)."""
    q = np.asarray(quality, dtype=float)
    q = q[np.isfinite(q)]
    return float(q.mean()) if len(q) else float("nan")


def share_reaching(quality, target: float) -> float:
    """The share of images whose realised quality reaches ``target`` (an image without one misses)."""
    q = np.asarray(quality, dtype=float)
    return float(np.mean(np.where(np.isfinite(q), q, -np.inf) >= target))


def wilson_bounds(share: float, n: int, z: float = 1.645) -> tuple[float, float]:
    """The one-sided Wilson bounds (z = 1.645: 95 %) of a share observed on ``n`` images."""
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def coverage_held(quality, target: float, coverage: float, z: float = 1.645) -> dict:
    """Is the coverage promise (>= ``coverage`` of images reach ``target``) held on these images?
    Held unless the share's one-sided Wilson upper bound falls below ``coverage`` (the data refute
    the promise at that confidence). Returns {"share", "n", "lower", "upper", "held"}."""
    q = np.asarray(quality, dtype=float)
    share = share_reaching(q, target)
    lower, upper = wilson_bounds(share, len(q), z)
    return {"share": share, "n": int(len(q)), "lower": lower, "upper": upper, "held": bool(upper >= coverage)}


def conformal_lower_bound(values, coverage: float) -> float:
    """Split-conformal lower bound: the k-th smallest of the n values with k = floor((n + 1)(1 - c)),
    so a new exchangeable value is >= it with probability >= c; -inf when n is too small (k < 1).
    A value that is not finite counts as -inf (an image without a quality misses every target)."""
    v = np.asarray(values, dtype=float)
    v = np.sort(np.where(np.isfinite(v), v, -np.inf))
    k = math.floor((len(v) + 1) * (1.0 - coverage) + 1e-9)  # + 1e-9: 0.2 is 0.19999... in binary
    return float(v[k - 1]) if k >= 1 else float("-inf")
