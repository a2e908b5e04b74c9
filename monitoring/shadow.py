"""Shadow evaluation: the quality a budgeted service actually delivered, measured off the hot path.

The model deployment samples a fraction of the images it served (``ShadowSampler``: a seeded coin
per image, a bounded queue, drops counted) and sends each to the low-priority ``ShadowEvaluator``
deployment, which

1. re-renders the same prompt with the same seed, scheduler and guidance at the reference step
   count (the bundle's full steps, 50) on the base model: the image the request would have got
   without any budget;
2. scores the served image against it on every level (``MetricScorer``: pixel SSIM/PSNR, LPIPS,
   I-CLIP) and against the prompt (CLIP-T, and attr_acc on the attributes the prompt states, as
   ``budgetdiff score`` does: ``budgetdiff.domain.parse.parse_stated_scene``; what was scored is recorded,
   and a prompt it cannot read is recorded with the reason);
3. computes the realised quality exactly as ``quality_target`` and ``bench_auto`` define it: the
   lowest of SSIM, 1 - LPIPS and I-CLIP (``budgetdiff.statistics.quality.realised_quality``);
4. judges the request: **good** when the realised quality reaches the quality target the request
   asked for; a request that gave none is judged against what the auto policy promised for the
   plan it ran (its route's conformal lower bound at the policy's coverage), or against the
   service's ``default_quality_target`` when one is set. The quality SLO is
   the share of good sampled requests (``slo_summary``).

Everything is exported as metrics (``monitoring.names``) and, in batches, logged to MLflow.
Nothing here imports Ray: the deployments in ``serving.app`` wrap these classes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import os
import random
import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable

from .metrics import MemoryMetrics, MetricsSink

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ShadowJob:
    """One served image to evaluate: what was asked, what was served, and by which model."""

    prompt: str
    mode: str
    seed: int
    scheduler: str | None            # the scheduler the image ran with
    guidance: float | None           # the guidance the caller asked for (None: the model's default)
    quality_target: float | None     # the request's target (None: the service default applies)
    image_b64: str                   # the served PNG
    model_version: str
    record: dict = field(default_factory=dict)
    sampled_at: float = field(default_factory=time.time)


def jobs_from_reply(requests: list, reply: dict) -> list[ShadowJob]:
    """One ``ShadowJob`` per image of a successful model reply: image i answers ``requests[i]``
    (a ``GenerationRequest``)."""
    if "error" in reply:
        return []
    version = (reply.get("model_version") or {}).get("id", "unknown")
    jobs = []
    for request, image in zip(requests, reply.get("images") or []):
        rec = image.get("record") or {}
        jobs.append(ShadowJob(prompt=request.prompt, mode=request.mode, seed=int(rec["seed"]),
                              scheduler=rec.get("scheduler"), guidance=request.guidance,
                              quality_target=request.quality_target, image_b64=image["b64_json"],
                              model_version=version, record=rec))
    return jobs


# ------------------------------------------------------------------------------------------------
# Model side: sample, queue (bounded), send
# ------------------------------------------------------------------------------------------------
class ShadowSampler:
    """Samples served images into a bounded queue and sends them to the evaluator in the background.

    Args:
        rate: the fraction of served images to evaluate, in [0, 1].
        queue_size: the most images waiting here; one more is dropped (and counted).
        send: ``async send(job)``: hands a job to the evaluator (a Serve handle call). An exception
            (the evaluator's own queue is full: Serve's back-pressure) counts as a drop.
        sink: where the counters go.
        max_in_flight: jobs sent and not yet answered, at most.
        seed: the sampling coin's seed (reproducible sampling in tests and benchmarks).
    """

    def __init__(self, rate: float, queue_size: int, send: Callable[[ShadowJob], Awaitable[Any]],
                 sink: MetricsSink, max_in_flight: int = 1, seed: int = 0):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"shadow_sample_rate: must be in [0, 1], got {rate!r}")
        if queue_size < 1:
            raise ValueError(f"shadow_queue_size: must be >= 1, got {queue_size!r}")
        self.rate, self.queue_size, self.send, self.sink = rate, queue_size, send, sink
        self.max_in_flight = max(1, int(max_in_flight))
        self._rng = random.Random(seed)
        self._queue: deque[ShadowJob] = deque()
        self._wake: asyncio.Event | None = None
        self._workers: list[asyncio.Task] = []
        self.counts = {"offered": 0, "queued": 0, "dropped": 0, "sent": 0, "failed": 0}

    def configure(self, rate: float, queue_size: int) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"shadow_sample_rate: must be in [0, 1], got {rate!r}")
        self.rate, self.queue_size = rate, max(1, int(queue_size))

    def offer(self, requests: list, reply: dict) -> int:
        """Sample the images of one answered call (its ``GenerationRequest``\\ s and the reply;
        quick; never raises into the request). Returns how many were queued."""
        queued = 0
        if self.rate <= 0.0:
            return 0
        for job in jobs_from_reply(requests, reply):
            self.counts["offered"] += 1
            if self._rng.random() >= self.rate:
                continue
            if len(self._queue) >= self.queue_size:
                self.counts["dropped"] += 1
                self.sink.inc("budgetdiff_shadow_sampled", 1, {"outcome": "dropped"})
                continue
            self._queue.append(job)
            queued += 1
            self.counts["queued"] += 1
            self.sink.inc("budgetdiff_shadow_sampled", 1, {"outcome": "queued"})
        self.sink.set("budgetdiff_shadow_queue_depth", len(self._queue))
        if queued:
            self._ensure_workers()
            self._wake.set()
        return queued

    @property
    def depth(self) -> int:
        return len(self._queue)

    def _ensure_workers(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._workers = [w for w in self._workers if not w.done()]
        while len(self._workers) < self.max_in_flight:
            self._workers.append(asyncio.get_running_loop().create_task(self._work()))

    async def _work(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=30.0)
                except asyncio.TimeoutError:
                    return  # idle: the next offer starts a worker again
                continue
            job = self._queue.popleft()
            self.sink.set("budgetdiff_shadow_queue_depth", len(self._queue))
            try:
                await self.send(job)
                self.counts["sent"] += 1
            except Exception as exc:  # the evaluator's queue is full, or it is restarting
                self.counts["failed"] += 1
                self.counts["dropped"] += 1
                self.sink.inc("budgetdiff_shadow_sampled", 1, {"outcome": "dropped"})
                logger.debug("shadow job dropped: %s: %s", type(exc).__name__, exc)


# ------------------------------------------------------------------------------------------------
# The SLO arithmetic
# ------------------------------------------------------------------------------------------------
def is_good(realised: float | None, target: float) -> bool | None:
    """The per-request verdict: realised quality reaches the target (None: could not be scored)."""
    if realised is None or not math.isfinite(realised):
        return None
    return realised >= target - 1e-9


def slo_summary(verdicts: list[bool | None], objective: float) -> dict:
    """The quality SLO over sampled requests: the share of good ones among those scored, whether it
    meets ``objective``, the error budget left (1: no bad request; 0: exactly spent; < 0: overspent)
    and a 95 % Wilson interval for the share."""
    if not 0 < objective < 1:
        raise ValueError(f"objective: must be in (0, 1), got {objective!r}")
    scored = [v for v in verdicts if v is not None]
    n, good = len(scored), sum(1 for v in scored if v)
    if n == 0:
        return {"n": 0, "good": 0, "unscored": len(verdicts), "share_good": None, "objective": objective,
                "met": None, "error_budget_remaining": None, "share_good_ci95": None}
    share = good / n
    z = 1.959964
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"n": n, "good": good, "unscored": len(verdicts) - n, "share_good": share, "objective": objective,
            "met": share >= objective, "error_budget_remaining": 1.0 - (1.0 - share) / (1.0 - objective),
            "share_good_ci95": [max(0.0, centre - half), min(1.0, centre + half)]}


# ------------------------------------------------------------------------------------------------
# Evaluator side
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShadowSettings:
    """What the evaluator needs (``serving.config.ShadowOptions`` builds it from the user_config)."""

    model_source: str                 # a local bundle directory (resolved)
    clip_dir: str
    attributes_dir: str
    reference_steps: int | None = None    # None: the bundle's full steps
    default_quality_target: float | None = None  # None: the auto route's promise (requests without a target)
    objective: float = 0.95
    window: int = 50                  # shadow_score gauges: the mean over the last `window` evaluations
    device: str = "cpu"
    torch_threads: int = 1
    nice: int = 10                    # added niceness of the evaluator process (low priority)
    reference_cache: int = 256        # reference images kept (same prompt, seed, scheduler, guidance)


def _decode_png(b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


class ShadowEvaluator:
    """Re-renders, scores and judges sampled images (thread-safe; one evaluation at a time).

    Args:
        settings: a ``ShadowSettings``.
        sink: where metrics go.
        generator / scorer: already loaded components (tests pass tiny ones); loaded from
            ``settings`` otherwise.
        log_batch: called with a list of verdicts every ``log_every`` evaluations (MLflow).
        log_every: 0 disables batch logging.
    """

    def __init__(self, settings: ShadowSettings, sink: MetricsSink | None = None, generator=None, scorer=None,
                 log_batch: Callable[[list[dict]], None] | None = None, log_every: int = 0):
        import torch

        self.settings = settings
        self.sink = sink or MemoryMetrics()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        if generator is None:
            from budgetdiff.generation.engine import Generator

            generator = Generator.from_bundle(settings.model_source, device=settings.device)
        if scorer is None:
            from budgetdiff.metrics import MetricScorer, ScoringConfig

            scorer = MetricScorer(ScoringConfig(clip_dir=settings.clip_dir, attributes_dir=settings.attributes_dir,
                                                device=settings.device, batch_size=8))
        self.generator, self.scorer = generator, scorer
        self.log_batch, self.log_every = log_batch, int(log_every)
        self._lock = threading.Lock()
        self._refs: OrderedDict = OrderedDict()
        self._window: deque[dict] = deque(maxlen=max(1, settings.window))
        self._pending_log: list[dict] = []
        self.evaluated = 0
        self.errors = 0
        self.verdicts: deque[bool | None] = deque(maxlen=10_000)

    @staticmethod
    def lower_priority(nice: int) -> None:
        """Raise this process's niceness so the serving replicas get the CPU first."""
        if nice > 0 and hasattr(os, "nice"):
            try:
                os.nice(nice)
            except OSError:
                pass

    @property
    def reference_steps(self) -> int:
        if self.settings.reference_steps:
            return int(self.settings.reference_steps)
        bundle = getattr(self.generator, "bundle", None)
        return int(getattr(bundle, "base_steps", None) or 50)

    def _reference(self, job: ShadowJob):
        from budgetdiff.generation.engine import GenerationRequest

        key = (job.prompt, job.seed, job.scheduler, job.guidance, self.reference_steps)
        if key in self._refs:
            self._refs.move_to_end(key)
            return self._refs[key]
        request = GenerationRequest(job.prompt, mode="full", steps=self.reference_steps, scheduler=job.scheduler,
                                    guidance=job.guidance, seed=job.seed)
        image = self.generator([request], output_type="pil", batch_size=1)[0].image
        self._refs[key] = image
        while len(self._refs) > self.settings.reference_cache:
            self._refs.popitem(last=False)
        return image

    def target_for(self, job: ShadowJob) -> tuple[float | None, str]:
        """The quality a served image is judged against, and where it comes from: the request's
        ``quality_target``; else the service's ``default_quality_target`` when set; else, for an
        ``auto`` request, what the bundle's auto policy promised for the route it ran (the
        candidate's conformal lower bound at the policy's coverage; the reference plan is the
        full-step image itself). None when nothing was promised (the verdict is then unscored)."""
        if job.quality_target is not None:
            return float(job.quality_target), "request"
        if self.settings.default_quality_target is not None:
            return float(self.settings.default_quality_target), "service_default"
        policy = getattr(self.generator, "auto_policy", None)
        route = (job.record or {}).get("route")
        if job.mode == "auto" and policy is not None and route:
            if route == "reference":
                return 1.0 - 1e-6, "auto_route_promise"
            try:
                bound = policy.candidate(route).lower_bound(policy.coverage)
            except ValueError:
                bound = None
            if bound is not None:
                return float(bound), "auto_route_promise"
        return None, "none"

    def _stated(self, prompt: str) -> tuple[dict | None, list[str], str | None]:
        """What ``domain/attr_acc`` scores in ``prompt`` (``parse_stated_scene``, the reading
        ``MetricScorer`` and ``budgetdiff score`` use): (the scored objects and background, the
        words left unscored, why nothing is scored or None)."""
        from budgetdiff.domain.parse import parse_stated_scene
        from budgetdiff.domain.scenes import PromptParseError

        try:
            stated = parse_stated_scene(prompt)
        except PromptParseError as exc:
            return None, [], str(exc)
        if self.scorer.checker is None:
            return None, [], "no attribute checker loaded"
        return stated.scored(), list(stated.skipped), None

    def evaluate(self, job: ShadowJob) -> dict:
        """Score one served image; returns its verdict record (also exported and logged)."""
        from budgetdiff.statistics.quality import QualityError, realised_quality

        start = time.perf_counter()
        target, target_from = self.target_for(job)
        verdict = {"prompt": job.prompt, "mode": job.mode, "seed": job.seed, "scheduler": job.scheduler,
                   "model_version": job.model_version, "quality_target": target, "target_from": target_from,
                   "reference_steps": self.reference_steps, "steps": job.record.get("steps"),
                   "nfe": job.record.get("nfe"), "route": job.record.get("route"), "sampled_at": job.sampled_at}
        with self._lock:
            try:
                served = _decode_png(job.image_b64)
                ref = self._reference(job)
                # every level, CLIP-T and attr_acc (on the attributes the prompt states) as `budgetdiff score`
                values = self.scorer.score([served], refs=[ref], prompts=[job.prompt])
                levels = {k: float(v[0]) for k, v in values.items()}
                if not math.isfinite(levels.get("domain/attr_acc", 0.0)):
                    del levels["domain/attr_acc"]  # NaN: nothing in the prompt the checker can judge
                scored, skipped, reason = self._stated(job.prompt)
                try:
                    realised = realised_quality(levels)
                except QualityError:
                    realised = None
                if realised is not None and not math.isfinite(realised):
                    realised = None  # no finite level: unscored
                good = is_good(realised, target) if target is not None else None
                verdict.update({"levels": levels, "realised_quality": realised, "good": good,
                                "attr_scored": scored if "domain/attr_acc" in levels else None,
                                "attr_skipped": skipped, "attr_parse_error": reason,
                                "seconds": round(time.perf_counter() - start, 3)})
                self.evaluated += 1
            except Exception as exc:
                self.errors += 1
                self.sink.inc("budgetdiff_shadow_errors", 1, {})
                verdict.update({"error": f"{type(exc).__name__}: {exc}", "good": None, "realised_quality": None})
                logger.exception("shadow evaluation failed")
                return verdict
            self.verdicts.append(good)
            self._export(verdict)
            self._log(verdict)
        return verdict

    def _export(self, v: dict) -> None:
        mode = v["mode"]
        slo = "unscored" if v["good"] is None else ("good" if v["good"] else "bad")
        self.sink.inc("budgetdiff_shadow_evaluations", 1, {"mode": mode, "slo": slo})
        self.sink.set("budgetdiff_shadow_last_eval_timestamp_seconds", time.time())
        if v["realised_quality"] is not None:
            self.sink.observe("budgetdiff_realised_quality", v["realised_quality"], {"mode": mode})
            if v["good"] is False:
                self.sink.observe("budgetdiff_quality_shortfall", v["quality_target"] - v["realised_quality"],
                                  {"mode": mode})
        self._window.append(v["levels"])
        names = {k for levels in self._window for k in levels}
        for name in names:
            vals = [lv[name] for lv in self._window if name in lv and math.isfinite(lv[name])]
            if vals:
                self.sink.set("budgetdiff_shadow_score", sum(vals) / len(vals), {"metric": name})

    def _log(self, v: dict) -> None:
        if not self.log_every or self.log_batch is None:
            return
        self._pending_log.append(v)
        if len(self._pending_log) >= self.log_every:
            batch, self._pending_log = self._pending_log, []
            try:
                self.log_batch(batch)
            except Exception:
                logger.exception("shadow: logging a batch to MLflow failed (kept serving)")

    def flush(self) -> None:
        """Log what is pending (shutdown)."""
        if self._pending_log and self.log_batch is not None:
            batch, self._pending_log = self._pending_log, []
            self.log_batch(batch)

    def summary(self) -> dict:
        return {"evaluated": self.evaluated, "errors": self.errors,
                "slo": slo_summary(list(self.verdicts), self.settings.objective),
                "settings": asdict(self.settings)}


def mlflow_batch_logger(experiment: str, run_name: str = "shadow", tracking_uri: str | None = None):
    """A ``log_batch`` for ``ShadowEvaluator`` that logs each batch of verdicts to one MLflow run per
    evaluator process: the batch's good share, mean realised quality and mean level metrics as
    metrics (step = evaluations so far), and the verdicts as a JSON artifact."""
    state = {"run_id": None, "step": 0}

    def log_batch(batch: list[dict]) -> None:
        import mlflow

        from mlops.tracking import tracking_uri as default_uri

        from registry.store import artifact_location

        uri = tracking_uri or default_uri()
        client = mlflow.MlflowClient(uri)
        if state["run_id"] is None:
            exp = client.get_experiment_by_name(experiment)
            # a sqlite store keeps artifacts beside the database, not in the replica's working dir
            exp_id = exp.experiment_id if exp else client.create_experiment(
                experiment, artifact_location=artifact_location(uri))
            state["run_id"] = client.create_run(exp_id, run_name=run_name, tags={"component": "shadow"}).info.run_id
        state["step"] += len(batch)
        scored = [v for v in batch if v.get("good") is not None]
        metrics = {"shadow/batch_size": len(batch)}
        if scored:
            metrics["shadow/share_good"] = sum(1 for v in scored if v["good"]) / len(scored)
            metrics["shadow/realised_quality"] = sum(v["realised_quality"] for v in scored) / len(scored)
            names = {k for v in scored for k in v.get("levels", {})}
            for name in names:
                vals = [v["levels"][name] for v in scored if name in v.get("levels", {})]
                if vals:
                    metrics[f"shadow/{name}"] = sum(vals) / len(vals)
        ts = int(time.time() * 1000)
        client.log_batch(state["run_id"], metrics=[mlflow.entities.Metric(k, float(val), ts, state["step"])
                                                   for k, val in metrics.items()])
        client.log_dict(state["run_id"], {"verdicts": batch}, f"shadow/verdicts_{state['step']:08d}.json")

    return log_batch
