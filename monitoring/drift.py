"""Serving-side prompt drift: the glue between the model deployment and ``budgetdiff.statistics.drift``.

``ServingDriftMonitor.observe(prompt)`` is what the model deployment calls for every served prompt.
It costs a lock and a deque append; the deque keeps only the latest ``window`` prompts, so memory is
bounded however fast prompts arrive. Every ``window`` observed prompts the latest window is tested
against the budget predictor's training prompts (kernel MMD permutation test and classifier
two-sample test on pooled MiniLM embeddings, ``budgetdiff.statistics.drift``) in a background thread, and the
gauges ``budgetdiff_drift_mmd_pvalue``, ``budgetdiff_drift_c2st_pvalue``, ``budgetdiff_drift_c2st_auc``
and ``budgetdiff_drift_window_prompts`` (``monitoring.names``) are set through the injected
``set_gauge(name, value)`` callable (e.g. ``MetricsSink.set`` of ``monitoring.metrics``). While a
test runs, prompts keep being observed; a window that falls due meanwhile is tested when the
running test has finished (its prompts are then the latest ``window``; the count of windows passed
over is kept in ``windows_skipped``). Nothing here imports Ray.

``drift_benchmark`` is the bench_monitor stage's drift check: an out-of-domain prompt set must be
flagged, and in-domain held-out windows (the same sampler, seeds disjoint from training's) must be
flagged at most 5 % of the time.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from budgetdiff.statistics.drift import (
    DEFAULT_ALPHA,
    DEFAULT_PERMUTATIONS,
    DEFAULT_WINDOW,
    N_TESTS,
    DriftMonitor,
    DriftResult,
    Embedder,
    _check_window,
    _load_params,
    default_embedder,
    prompt_table,
    reference_prompts,
)
from budgetdiff.domain.prompt_table import scene_prompt_rows

from .names import BY_NAME

log = logging.getLogger(__name__)

MMD_PVALUE = "budgetdiff_drift_mmd_pvalue"
C2ST_PVALUE = "budgetdiff_drift_c2st_pvalue"
C2ST_AUC = "budgetdiff_drift_c2st_auc"
WINDOW_PROMPTS = "budgetdiff_drift_window_prompts"
GAUGES = (MMD_PVALUE, C2ST_PVALUE, C2ST_AUC, WINDOW_PROMPTS)
for _name in GAUGES:  # fail at import if monitoring.names loses or retypes one of them
    assert BY_NAME[_name].kind == "gauge", _name

SetGauge = Callable[[str, float], Any]


def gauge_values(result: DriftResult) -> dict[str, float]:
    """The four drift gauges for one tested window."""
    return {MMD_PVALUE: result.mmd.p_value, C2ST_PVALUE: result.c2st.p_value, C2ST_AUC: result.c2st.auc,
            WINDOW_PROMPTS: float(result.n_prompts)}


class ServingDriftMonitor:
    """Bounded, non-blocking drift monitoring of served prompts (module docstring).

    Args:
        reference: the reference prompts (embedded in the background thread on the first window)
            or their (n, d) embeddings; ``from_params`` uses the budget predictor's training prompts.
        set_gauge: called as ``set_gauge(name, value)`` for each of ``GAUGES`` after every window.
        embed: prompts -> (N, d) embeddings; default pooled MiniLM (loaded on the first window). To
            share the served pipeline's encoder: ``MiniLMEmbedder(pipe.text_encoder, pipe.tokenizer)``.
        window: prompts per tested window (>= 10); also the deque's bound.
        alpha, n_permutations, seed: as ``budgetdiff.statistics.drift.DriftMonitor``.
        on_result: optional callback with each ``DriftResult`` (e.g. to log it).
    """

    def __init__(self, reference: Sequence[str] | np.ndarray, *, set_gauge: SetGauge | None = None,
                 embed: Embedder | None = None, window: int = DEFAULT_WINDOW, alpha: float = DEFAULT_ALPHA,
                 n_permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0,
                 on_result: Callable[[DriftResult], Any] | None = None):
        self.window = _check_window(window)
        if len(reference) < 4:
            raise ValueError(f"reference: needs at least 4 prompts, got {len(reference)}")
        self._reference = reference
        self._set_gauge = set_gauge or (lambda name, value: None)
        self._embed, self.alpha, self.n_permutations, self.seed = embed, alpha, n_permutations, seed
        self._on_result = on_result
        self._buffer: deque[str] = deque(maxlen=self.window)
        self._since = 0                      # prompts observed since the last window was taken
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._monitor: DriftMonitor | None = None
        self.observed = 0
        self.windows_started = 0
        self.windows_tested = 0
        self.windows_skipped = 0
        self.errors = 0
        self.last_result: DriftResult | None = None
        self.last_error: str | None = None
        self.gauges: dict[str, float] = {}

    @classmethod
    def from_params(cls, params: Mapping | str = "params.yaml", **kwargs) -> "ServingDriftMonitor":
        """Monitor against the budget predictor's training prompts, regenerated from params.yaml."""
        return cls(reference_prompts(params), **kwargs)

    def __len__(self) -> int:
        """Prompts held (at most ``window``)."""
        return len(self._buffer)

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def observe(self, prompt: str) -> bool:
        """Record one served prompt; returns True when it started a window's test."""
        with self._lock:
            self._buffer.append(prompt)
            self.observed += 1
            self._since += 1
            if self._since < self.window or self.busy:
                return False
            self.windows_skipped += self._since // self.window - 1
            self._since = 0
            snapshot = list(self._buffer)
            self._thread = threading.Thread(target=self._run, args=(snapshot, self.windows_started),
                                            name="drift-window", daemon=True)
            self.windows_started += 1
            self._thread.start()
            return True

    def observe_many(self, prompts: Sequence[str]) -> int:
        """``observe`` each prompt; returns the number of window tests started."""
        return sum(self.observe(p) for p in prompts)

    def _run(self, prompts: list[str], index: int) -> None:
        try:
            if self._monitor is None:
                self._monitor = DriftMonitor(self._reference, embed=self._embed or default_embedder(), window=self.window,
                                             alpha=self.alpha, n_permutations=self.n_permutations, seed=self.seed)
            result = self._monitor.test(prompts, window_index=index)
        except Exception as exc:  # a monitoring failure must never reach the serving path
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("drift window test failed: %s", self.last_error)
            return
        self.last_result = result
        self.windows_tested += 1
        for name, value in gauge_values(result).items():
            try:
                self._set_gauge(name, value)
                self.gauges[name] = value
            except Exception as exc:
                self.errors += 1
                self.last_error = f"set_gauge({name}): {type(exc).__name__}: {exc}"
                log.warning("drift gauge failed: %s", self.last_error)
        if result.flagged:
            log.warning("prompt drift: window %d flagged (MMD p %.4g, C2ST p %.4g, AUC %.3f, alpha %g)", index,
                        result.mmd.p_value, result.c2st.p_value, result.c2st.auc, result.alpha)
        if self._on_result is not None:
            try:
                self._on_result(result)
            except Exception as exc:
                log.warning("drift on_result callback failed: %s", exc)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a running window test; True when none is running afterwards."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.busy

    def stats(self) -> dict:
        return {"observed": self.observed, "held": len(self), "window": self.window,
                "windows_started": self.windows_started, "windows_tested": self.windows_tested, "windows_skipped": self.windows_skipped,
                "errors": self.errors, "last_error": self.last_error,
                "last": self.last_result.to_record() if self.last_result else None}


# ------------------------------------------------------------------------------------------------
# The bench_monitor drift check
# ------------------------------------------------------------------------------------------------
_SUBJECTS = (
    "a golden retriever", "a tabby cat asleep", "a red vintage sports car", "a bowl of ramen",
    "an old stone lighthouse", "a snowy mountain lake", "a busy city street", "a bouquet of wild roses",
    "an astronaut", "a wooden cabin", "a cup of cappuccino", "a child flying a kite", "a herd of elephants",
    "a steam locomotive", "a medieval castle", "a bicycle leaning on a wall", "a plate of pancakes with berries",
    "a hot air balloon", "a fox in the snow", "a sailboat", "a cozy reading nook", "a street food stall",
    "a waterfall", "a portrait of an elderly fisherman", "a robot barista",
)
_SETTINGS = (
    "on a beach at sunset", "in the rain", "in a misty forest", "at night under neon lights",
    "in a crowded market", "on a kitchen table", "in the middle of a desert", "during autumn",
    "in front of the Eiffel Tower", "on a snowy morning", "in a sunlit living room", "by a quiet river",
)
_STYLES = (
    "a photo of {s} {p}", "an oil painting of {s} {p}", "a watercolor illustration of {s} {p}",
    "{s} {p}, 35mm film photograph", "{s} {p}, highly detailed digital art", "a cinematic shot of {s} {p}",
    "{s} {p}, studio ghibli style", "a black and white photograph of {s} {p}",
)


def out_of_domain_prompts(n: int = 100, seed: int = 0) -> list[str]:
    """``n`` distinct everyday text-to-image prompts ("a photo of a golden retriever on a beach at
    sunset"), drawn deterministically from word lists: nothing like the scene domain."""
    combos = [(s, p, t) for s in _SUBJECTS for p in _SETTINGS for t in _STYLES]
    if n > len(combos):
        raise ValueError(f"n: at most {len(combos)} out-of-domain prompts, got {n}")
    rng = random.Random(seed)
    return [t.format(s=s, p=p) for s, p, t in rng.sample(combos, n)]


def drift_benchmark(params: Mapping | str = "params.yaml", *, embed: Embedder | None = None,
                    window: int = DEFAULT_WINDOW, n_windows: int = 40, heldout_seed_offset: int = 70_000_000,
                    alpha: float = DEFAULT_ALPHA, n_permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0,
                    ood_prompts: Sequence[str] | None = None, shift_windows: int = 5,
                    max_false_positive_rate: float = 0.05, progress: bool = False) -> dict:
    """The drift check of bench_monitor. Every prompt is embedded once.

    (a) ``ood_prompts`` (default ``out_of_domain_prompts(window)``) as one window against the
        reference: both tests' p-values must be < 0.01 (and the window flagged at ``alpha``).
    (b) ``n_windows`` in-domain held-out windows of ``window`` prompts: the ``prompts`` stage's
        sampler and count weights with seeds from ``heldout_seed_offset`` (checked disjoint from the
        training prompts' seeds), shuffled and cut into windows; the share flagged at ``alpha`` (the
        false-positive rate) must be <= ``max_false_positive_rate``.
    (c) informative, no pass/fail: ``shift_windows`` windows of 1-object scenes only (a shift of
        complexity mix within the domain): the share flagged.
    """
    t0 = time.perf_counter()
    loaded = _load_params(params)
    cfg = loaded["prompts"]
    split = (loaded.get("train_budget") or {}).get("train_split", "train")
    table = prompt_table(loaded)
    train_rows = [r for r in table if r["split"] == split]
    reference = [r["prompt"] for r in train_rows]
    weights = cfg["count_weights"] if cfg.get("source", "scenes") == "scenes" else [0.25] * 4
    heldout_rows = scene_prompt_rows(n_windows * window, weights, heldout_seed_offset)
    overlap = {r["seed"] for r in heldout_rows} & {r["seed"] for r in table}
    if overlap and cfg.get("source", "scenes") == "scenes":
        raise ValueError(f"heldout_seed_offset: {len(overlap)} held-out seed(s) are the prompts stage's "
                         f"(e.g. {min(overlap)}); choose a disjoint range")
    order = np.random.default_rng(seed).permutation(len(heldout_rows))
    heldout = [heldout_rows[i]["prompt"] for i in order]
    shifted = [r["prompt"] for r in scene_prompt_rows(shift_windows * window, [1, 0, 0, 0],
                                                       heldout_seed_offset + 500_000)] if shift_windows else []
    ood = list(ood_prompts) if ood_prompts is not None else out_of_domain_prompts(window, seed)

    embed = embed or default_embedder(progress=progress)
    t_embed = time.perf_counter()
    ref_emb = np.asarray(embed(reference), dtype=np.float64)
    held_emb = np.asarray(embed(heldout), dtype=np.float64)
    shift_emb = np.asarray(embed(shifted), dtype=np.float64) if shifted else None
    ood_emb = np.asarray(embed(ood), dtype=np.float64)
    embed_seconds = time.perf_counter() - t_embed

    t_tests = time.perf_counter()
    monitor = DriftMonitor(ref_emb, embed=embed, window=window, alpha=alpha, n_permutations=n_permutations, seed=seed)
    ood_result = monitor.test(ood_emb, window_index=0)
    held = [monitor.test(held_emb[i * window:(i + 1) * window], window_index=1 + i) for i in range(n_windows)]
    shift = [monitor.test(shift_emb[i * window:(i + 1) * window], window_index=1 + n_windows + i)
             for i in range(shift_windows)] if shifted else []
    test_seconds = time.perf_counter() - t_tests

    level = alpha / N_TESTS
    flagged = sum(r.flagged for r in held)
    fpr = flagged / n_windows if n_windows else 0.0
    ood_max_p = max(ood_result.mmd.p_value, ood_result.c2st.p_value)
    ood_pass = bool(ood_max_p < 0.01 and ood_result.flagged)
    held_pass = bool(fpr <= max_false_positive_rate)
    mmd_p = np.array([r.mmd.p_value for r in held]) if held else np.zeros(0)
    c2st_p = np.array([r.c2st.p_value for r in held]) if held else np.zeros(0)
    reference_seeds = [r["seed"] for r in train_rows]
    return {
        "reference": {"prompts": len(reference), "split": split, "seed_range": [min(reference_seeds), max(reference_seeds)],
                      "source": "the prompts stage regenerated from params.yaml (budgetdiff.statistics.drift.prompt_table)"},
        "embedding": "pooled MiniLM sentence embedding (budgetdiff.text.encode_prompts), L2-normalised",
        "alpha": alpha, "correction": "bonferroni", "per_test_level": level, "n_permutations": int(n_permutations),
        "window": window,
        "out_of_domain": {"prompts": len(ood), "mmd_pvalue": ood_result.mmd.p_value,
                          "c2st_pvalue": ood_result.c2st.p_value, "c2st_auc": ood_result.c2st.auc,
                          "flagged": ood_result.flagged, "target": "both p < 0.01 and flagged", "pass": ood_pass,
                          "examples": ood[:3]},
        "in_domain": {"windows": n_windows, "window": window, "seed_offset": heldout_seed_offset,
                      "count_weights": list(weights),
                      "seed_range": [min(r["seed"] for r in heldout_rows), max(r["seed"] for r in heldout_rows)],
                      "prompts_also_in_reference": len(set(heldout) & set(reference)),
                      "flagged": int(flagged), "false_positive_rate": round(fpr, 4),
                      "mmd_rejections": int((mmd_p < level).sum()), "c2st_rejections": int((c2st_p < level).sum()),
                      "mean_mmd_pvalue": round(float(mmd_p.mean()), 4) if held else None,
                      "mean_c2st_pvalue": round(float(c2st_p.mean()), 4) if held else None,
                      "mean_c2st_auc": round(float(np.mean([r.c2st.auc for r in held])), 4) if held else None,
                      "window_pvalues": [round(float(r.p_value), 5) for r in held],
                      "target": f"false_positive_rate <= {max_false_positive_rate}", "pass": held_pass},
        "composition_shift": {"description": "1-object scenes only (the reference: 25 % each of 1-4 objects)",
                              "windows": len(shift), "flagged": int(sum(r.flagged for r in shift)),
                              "detection_rate": round(sum(r.flagged for r in shift) / len(shift), 4) if shift else None,
                              "mean_c2st_auc": round(float(np.mean([r.c2st.auc for r in shift])), 4) if shift else None},
        "seconds": {"embedding": round(embed_seconds, 2), "tests": round(test_seconds, 2),
                    "total": round(time.perf_counter() - t0, 2),
                    "prompts_embedded": len(reference) + len(heldout) + len(shifted) + len(ood)},
        "pass": ood_pass and held_pass,
    }
