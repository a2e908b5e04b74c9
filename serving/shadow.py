"""The shadow deployment: ``ShadowEvaluator`` wraps ``monitoring.shadow.ShadowEvaluator`` (re-render
at the reference steps, score, judge against the request's quality target) and the drift monitor
over served prompts. It runs at low priority (niceness, one thread) and its bounded Serve queue
(``max_ongoing_requests`` / ``max_queued_requests`` in the profile) is the shadow's back-pressure:
a model replica whose job is refused counts a drop and serves on.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .config import ShadowOptions

logger = logging.getLogger("ray.serve")


class ShadowEvaluatorBase:
    """Loads the evaluator on the first ``reconfigure``; swaps it when the model source changes."""

    def __init__(self, metrics=None):
        from monitoring.metrics import MemoryMetrics

        self.metrics = metrics if metrics is not None else MemoryMetrics()
        self.core = None
        self.drift = None
        self.options: ShadowOptions | None = None
        self._lock: asyncio.Lock | None = None
        self._lowered = False
        self._gauge_refresher = None

    async def reconfigure(self, user_config: dict | None) -> None:
        options = ShadowOptions.from_dict(user_config).resolved()
        if self._lock is None:
            self._lock = asyncio.Lock()
        if self._gauge_refresher is None:
            from .model import refresh_gauges_forever

            self._gauge_refresher = asyncio.get_running_loop().create_task(refresh_gauges_forever(self.metrics))
        async with self._lock:
            if not options.enabled:
                self.core, self.drift, self.options = None, None, options
                return
            if not self._lowered:
                from monitoring.shadow import ShadowEvaluator

                ShadowEvaluator.lower_priority(options.nice)
                self._lowered = True
            if self.core is None or self.options is None or self._reload_needed(options):
                self.core = await asyncio.to_thread(self._load, options)
            self.options = options
            self.drift = await asyncio.to_thread(self._drift_monitor, options, self.drift)

    def _reload_needed(self, options: ShadowOptions) -> bool:
        keys = ("model_source", "clip_dir", "attributes_dir", "device", "reference_steps",
                "default_quality_target", "objective", "window", "torch_threads", "mlflow_log_every",
                "mlflow_experiment")
        return any(getattr(options, k) != getattr(self.options, k) for k in keys)

    def _load(self, options: ShadowOptions):
        from monitoring.shadow import ShadowEvaluator, ShadowSettings, mlflow_batch_logger

        from .sources import resolve_model_source

        # a registry URI (models:/budgetdiff@champion) is resolved once, at load
        bundle_dir = resolve_model_source(options.model_source).bundle_dir
        settings = ShadowSettings(model_source=bundle_dir, clip_dir=options.clip_dir,
                                  attributes_dir=options.attributes_dir, reference_steps=options.reference_steps,
                                  default_quality_target=options.default_quality_target,
                                  objective=options.objective, window=options.window, device=options.device,
                                  torch_threads=options.torch_threads, nice=options.nice)
        log_batch = mlflow_batch_logger(options.mlflow_experiment) if options.mlflow_log_every else None
        start = time.perf_counter()
        core = ShadowEvaluator(settings, self.metrics, log_batch=log_batch, log_every=options.mlflow_log_every)
        logger.info("shadow evaluator loaded from %s in %.1fs", options.model_source, time.perf_counter() - start)
        return core

    def _drift_monitor(self, options: ShadowOptions, current):
        if not options.drift_window:
            return None
        if current is not None and current.window == options.drift_window and current.alpha == options.drift_alpha:
            return current
        from budgetdiff.statistics.drift import MiniLMEmbedder
        from monitoring.drift import ServingDriftMonitor

        from mlops.repo import REPO_ROOT

        embed = None
        if self.core is not None:  # the base model's own frozen MiniLM: no second copy in memory
            pipe = self.core.generator.models["base"].pipe
            embed = MiniLMEmbedder(pipe.text_encoder, pipe.tokenizer)
        return ServingDriftMonitor.from_params(str(REPO_ROOT / "params.yaml"), window=options.drift_window,
                                               alpha=options.drift_alpha, embed=embed,
                                               set_gauge=lambda name, value: self.metrics.set(name, value))

    def check_health(self) -> None:
        if self.core is None and (self.options is None or self.options.enabled):
            raise RuntimeError("shadow evaluator not loaded yet")

    async def evaluate(self, job) -> dict:
        if self.core is None:
            raise RuntimeError("shadow evaluator disabled" if self.options is not None else "not loaded yet")
        return await asyncio.to_thread(self.core.evaluate, job)

    async def observe_prompts(self, prompts: list[str]) -> None:
        if self.drift is not None:
            self.drift.observe_many(prompts)

    async def summary(self) -> dict:
        out = self.core.summary() if self.core is not None else {}
        if self.drift is not None:
            out["drift"] = self.drift.stats()
        return out


class ShadowEvaluatorDeployment(ShadowEvaluatorBase):
    """The Serve deployment class (metrics through ``ray.serve.metrics``)."""

    def __init__(self):
        from monitoring.metrics import RayMetrics

        super().__init__(metrics=RayMetrics())
