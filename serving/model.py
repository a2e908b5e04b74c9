"""The model deployment: one ``Generator`` per replica, step-level batching, in-place model swaps.

``ImageModel`` (the Serve deployment, bound in ``serving.app``) takes a call from the ingress (one
HTTP request: its ``GenerationRequest``\ s, one per image, already validated by the ingress),
checks only what the loaded bundle supports (``Generator.check_supported``: a mode whose part is
missing, the size) and batches it one of two ways (user_config ``batching``):

- ``step`` (the default): the call's requests go to the replica's one ``StepBatcher``
  (``budgetdiff.generation.continuous``), whose loop runs in a thread of its own. Every denoising iteration
  makes one UNet call per model over every in-flight image that needs a prediction, whatever its
  plan (steps, scheduler, guidance, skipping); new images join at iteration boundaries and a call
  is answered as soon as its last image is done, so a 5-step request never waits for a 50-step
  one to end. The row budget, admission limit, queue bound, policy and latency slack are the
  ``step_*`` keys of the profile. A call whose client went away (the ingress timed out or cancelled
  it) cancels its ticket: its images leave at the next iteration and free their rows. A full
  step queue answers ``queue_full`` (the ingress turns it into 503/429 with Retry-After).
- ``request``: request-level batching as before the step scheduler: ``@serve.batch`` collects up
  to ``max_batch_size`` images, ``Generator.run_grouped`` runs each group of equal plans as one
  pipeline call to its end, one group after another. Kept as the baseline.

Either way every image keeps its own seed, so an image does not depend on what it shared calls
with. Swapping a model (``reconfigure`` with a new ``model_source`` or ``skip_policy``) loads the
new ``Generator`` in a thread while the old one keeps serving, then replaces one reference. A call
holds the ``ServedModel`` it was checked against until its images are done (under step batching
its images carry that generator into the shared scheduler, which may hold images of both models
for a while, never in one UNet call), so no request fails or mixes versions during a switch, and
every reply names the version that produced it.

``LocalImageModel`` is the same logic without Ray (no ``@serve.batch``: under request batching a
call's images run as one batch): tests and the in-process benchmark baseline use it.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from .config import ModelOptions

logger = logging.getLogger("ray.serve")

PROMPT_BATCH = 16  # served prompts forwarded to the shadow deployment's drift monitor per call


@dataclass
class ServedModel:
    """A loaded generator and what replies say about it."""

    generator: Any
    options: ModelOptions
    version: dict
    native_sizes: list[str]
    modes: list[str] = field(default_factory=list)  # what the generator serves: found once, at load
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict:
        gen = self.generator
        return {"version": self.version, "sizes": self.native_sizes,
                "modes": self.modes, "max_batch_size": self.options.max_batch_size,
                **self.options.batching_record(),
                "device": str(gen.models["base"].pipe.device), "loaded_at": self.loaded_at}


@dataclass
class ImageJob:
    """One image to generate, with the model it was checked against."""

    served: ServedModel
    request: Any  # budgetdiff.generation.engine.GenerationRequest
    enqueued: float = field(default_factory=time.perf_counter)


class ModelCallError(Exception):
    """A call the model cannot serve: carries the HTTP status and the API field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def to_dict(self) -> dict:
        return {"error": {"status": self.status, "message": self.message, "param": self.param, "code": self.code}}


def available_modes(gen) -> list[str]:
    """The modes this generator can serve (``check_supported`` accepts them)."""
    from budgetdiff.generation.engine import MODES, GenerationRequest
    from budgetdiff.errors import RequestError

    modes = []
    for mode in MODES:
        try:
            gen.check_supported(GenerationRequest("a red circle", mode=mode))
            modes.append(mode)
        except RequestError:
            pass
    return modes


def model_version(gen, source) -> dict:
    """What produced an image: the bundle (settings hash), each model's UNet hash, the skip policy,
    and the registry version when the source is a registry URI. ``id`` hashes all of them."""
    from budgetdiff.io.fingerprint import content_sha256

    parts = {
        "bundle_sha256": gen.bundle.sha256 if gen.bundle else None,
        "unet_sha256": {name: m.unet_sha256 for name, m in gen.models.items()},
        "skip_policy_sha256": gen.skip_policy.sha256 if gen.skip_policy else None,
        "registry_version": source.registry_version,
    }
    return {"id": "bd-" + content_sha256(parts, 12), "source": source.source, "bundle_dir": source.bundle_dir,
            **parts, **({"registry": source.info} if source.info else {})}


def _torch_threads(options: ModelOptions) -> int | None:
    if options.torch_threads:
        return options.torch_threads
    try:  # inside a Ray replica: the CPUs it was given
        import ray

        if not ray.is_initialized():  # get_runtime_context() would start a local Ray
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        return max(1, int(round(cpus))) if cpus else None
    except Exception:
        return None


def load_served_model(options: ModelOptions) -> ServedModel:
    """Load ``options``' bundle (and skip-policy override) into a new ``ServedModel``; warm it up."""
    import torch

    from budgetdiff.generation.engine import GenerationRequest, Generator

    from .sources import resolve_model_source

    threads = _torch_threads(options)
    if threads:
        torch.set_num_threads(threads)
    source = resolve_model_source(options.model_source)
    device = options.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = None if options.dtype == "auto" else getattr(torch, options.dtype)
    start = time.perf_counter()
    gen = Generator.from_bundle(source.bundle_dir, skip_policy=options.skip_policy or None, device=device,
                                dtype=dtype)
    if options.warmup:
        gen([GenerationRequest("a red circle", mode="full", steps=2)], batch_size=1)
    size = gen.models["base"].pipe.resolution
    served = ServedModel(gen, options, model_version(gen, source), [f"{size}x{size}"], available_modes(gen))
    logger.info("loaded %s from %s in %.2fs", served.version["id"], source.bundle_dir, time.perf_counter() - start)
    return served


def encode_png_b64(image) -> str:
    from budgetdiff.io import png_bytes

    return base64.b64encode(png_bytes(image)).decode("ascii")


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return _jsonable(value.item())
    return str(value)


def image_record(record, version: dict) -> dict:
    """The per-image record a reply carries: the engine's ``ImageRecord.summary`` and which model
    version ran it."""
    return _jsonable({**record.summary(), "model_version": version["id"]})


def run_jobs(jobs: list[ImageJob], batch_size: int | None = None) -> list[dict]:
    """Request-level batching: generate every job's image (the body of one ``@serve.batch`` call;
    runs in a thread) with ``Generator.run_grouped``: jobs with equal plans share pipeline calls of
    at most ``batch_size`` images, one group after another, as the service did before step-level
    batching. Jobs checked against different ``ServedModel``\\ s (a swap in between) run on their
    own model. Returns, per job, ``{"b64_json", "record"}`` or ``{"error": {...}}``; a record's
    ``queue_ms`` is the wait from the call's arrival to the batch's start, ``batch_ms`` the batch's
    generation time and ``batch_images`` the images in the ``@serve.batch`` call."""
    from budgetdiff.errors import RequestError

    results: list[dict | None] = [None] * len(jobs)
    groups: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(id(job.served), []).append(i)
    for indices in groups.values():
        served = jobs[indices[0]].served
        start = time.perf_counter()
        try:
            out = served.generator.run_grouped([jobs[i].request for i in indices], output_type="pil",
                                               batch_size=batch_size or served.options.max_batch_size)
        except RequestError as exc:  # checked before batching; a bug if it happens
            err = ModelCallError(422, str(exc), exc.field, "invalid_request").to_dict()
            for i in indices:
                results[i] = err
            continue
        except Exception as exc:  # keep the other groups of the batch alive
            logger.exception("generation failed")
            err = ModelCallError(500, f"generation failed: {type(exc).__name__}: {exc}", None,
                                 "generation_failed").to_dict()
            for i in indices:
                results[i] = err
            continue
        done = time.perf_counter()
        for i, result in zip(indices, out):
            record = image_record(result.record, served.version)
            record["queue_ms"] = round((start - jobs[i].enqueued) * 1000, 2)
            record["batch_ms"] = round((done - start) * 1000, 2)
            record["batch_images"] = len(jobs)
            record["batching"] = "request"
            results[i] = {"b64_json": encode_png_b64(result.image), "record": record}
    return results


def step_reply(job: ImageJob, result) -> dict:
    """One step-scheduled image as a reply entry. Its record's ``queue_ms`` is the wait from the
    call's submission to the image's admission into the denoising pool, ``batch_ms`` the time from
    admission to done (denoising while sharing UNet calls), ``batch_images`` the most images that
    shared one of its UNet calls and ``mean_call_images`` their mean."""
    rec = result.record
    record = image_record(rec, job.served.version)
    queue_s = rec.queue_seconds or 0.0
    record["queue_ms"] = round(queue_s * 1000, 2)
    record["batch_ms"] = round(((rec.latency_seconds or queue_s) - queue_s) * 1000, 2)
    record["batch_images"] = rec.batch_size
    record["batching"] = "step"
    return {"b64_json": encode_png_b64(result.image), "record": record}


async def refresh_gauges_forever(metrics, period_s: float = 5.0, before=None) -> None:
    """Keep the replica's gauges exported (``MetricsSink.refresh_gauges``); ``before()`` runs
    first each period (the step scheduler's events are flushed into the sink)."""
    while True:
        await asyncio.sleep(period_s)
        try:
            if before is not None:
                before()
            metrics.refresh_gauges()
        except Exception:
            logger.exception("gauge refresh failed")


class ImageModelBase:
    """The model deployment's logic: step-level batching here (``_run_step``); subclasses say how
    request-level batching runs (``_run_request``).

    Args:
        shadow: the shadow evaluator (a Serve handle to ``ShadowEvaluator``, or a local object with
            ``async evaluate(job)`` / ``async observe_prompts(prompts)``); None: no shadow.
        metrics: a ``monitoring.metrics.MetricsSink`` (default: in memory).
    """

    def __init__(self, shadow=None, metrics=None):
        from monitoring.metrics import MemoryMetrics, observe_call

        self._served: ServedModel | None = None
        self._options: ModelOptions | None = None
        self._reconfigure_lock: asyncio.Lock | None = None
        self.swaps = 0
        self.metrics = metrics if metrics is not None else MemoryMetrics()
        self._shadow = shadow
        self.sampler = None  # monitoring.shadow.ShadowSampler, made by reconfigure when a shadow exists
        self._prompts: list[str] = []
        self._pending_images = 0
        self._batcher = None  # budgetdiff.generation.continuous.StepBatcher, made by the first step-batching reconfigure
        # the step scheduler's observers run in its loop thread: they only append here (a deque is
        # thread-safe), and the replica's event loop moves the values into the metrics sink
        self._step_events: collections.deque = collections.deque(maxlen=100_000)
        self._poller: asyncio.Task | None = None
        self._gauge_refresher: asyncio.Task | None = None
        # called as fn(requests, reply, latency_s) after every answered call (metrics, shadow
        # sampling): must be quick and must not raise into the request
        self.observers: list = [lambda requests, reply, latency: observe_call(self.metrics, requests, reply,
                                                                              latency)]

    # -- configuration ----------------------------------------------------------------------
    async def reconfigure(self, user_config: dict | None) -> None:
        """Apply a user_config: load a new model when its source, policy, device or dtype changed
        (in a thread, while the current one keeps serving), then swap; update batch settings."""
        options = ModelOptions.from_dict(user_config).resolved()
        if self._reconfigure_lock is None:
            self._reconfigure_lock = asyncio.Lock()
        async with self._reconfigure_lock:
            if self._served is None or not options.loads_same_model(self._options):
                served = await asyncio.to_thread(load_served_model, options)
                if self._served is not None:
                    logger.info("swapping %s -> %s", self._served.version["id"], served.version["id"])
                self._swap(served)
            else:
                self._served.options = options
            self._options = options
            self._apply_batch_options(options)
            self._apply_shadow_options(options)
        self._start_poller(options)
        if self._gauge_refresher is None or self._gauge_refresher.done():
            self._gauge_refresher = asyncio.get_running_loop().create_task(
                refresh_gauges_forever(self.metrics, before=self.flush_step_events))

    # -- registry alias polling ---------------------------------------------------------------
    def _start_poller(self, options: ModelOptions) -> None:
        wanted = options.registry_poll_s > 0 and options.model_source.startswith("models:/") \
            and "@" in options.model_source
        if self._poller is not None and (not wanted or self._poller.done()):
            self._poller.cancel()
            self._poller = None
        if wanted and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_registry())

    async def poll_registry_once(self) -> bool:
        """Look the alias up; when it points at another version than the one served, load that one
        (in a thread, the current model serving on) and swap. True when it swapped."""
        from .sources import registry_version

        options = self._options
        if options is None or self._served is None:
            return False
        try:
            current = await asyncio.to_thread(registry_version, options.model_source)
        except ValueError as exc:
            logger.warning("registry poll: %s (keeping %s)", exc, self._served.version["id"])
            return False
        if current is None or current == self._served.version.get("registry_version"):
            return False
        async with self._reconfigure_lock:
            if self._options is not options:
                return False  # a reconfigure came in meanwhile: it wins
            served = await asyncio.to_thread(load_served_model, options)
            logger.info("registry alias %s moved: swapping %s -> %s", options.model_source,
                        self._served.version["id"], served.version["id"])
            self._swap(served)
        return True

    async def _poll_registry(self) -> None:
        while True:
            await asyncio.sleep(self._options.registry_poll_s)
            try:
                await self.poll_registry_once()
            except Exception:  # a failed load keeps the current model serving
                logger.exception("registry poll failed")

    def _swap(self, served: ServedModel) -> None:
        old = self._served
        self._served = served  # one reference: calls already running keep their own
        self.swaps += old is not None
        if old is not None:
            self.metrics.set("budgetdiff_model_info", 0, {"model_version": old.version["id"]})
        self.metrics.set("budgetdiff_model_info", 1, {"model_version": served.version["id"]})

    def _apply_shadow_options(self, options: ModelOptions) -> None:
        if self._shadow is None:
            return
        from monitoring.shadow import ShadowSampler

        if self.sampler is None:
            self.sampler = ShadowSampler(options.shadow_sample_rate, options.shadow_queue_size, self._send_shadow,
                                         self.metrics, options.shadow_max_in_flight, options.shadow_seed)
            self.observers.append(self._observe_shadow)
        else:
            self.sampler.configure(options.shadow_sample_rate, options.shadow_queue_size)

    async def _send_shadow(self, job) -> Any:
        return await self._shadow.evaluate.remote(job) if hasattr(self._shadow.evaluate, "remote") \
            else await self._shadow.evaluate(job)

    def _observe_shadow(self, requests: list, reply: dict, latency_s: float) -> None:
        if self.sampler is not None:
            self.sampler.offer(requests, reply)
        if "error" not in reply and requests:
            self._prompts.append(requests[0].prompt)
            if len(self._prompts) >= PROMPT_BATCH:
                batch, self._prompts = self._prompts, []
                asyncio.get_running_loop().create_task(self._send_prompts(batch))

    async def _send_prompts(self, prompts: list[str]) -> None:
        try:
            fn = self._shadow.observe_prompts
            await (fn.remote(prompts) if hasattr(fn, "remote") else fn(prompts))
        except Exception as exc:  # drift is best effort: never disturbs serving
            logger.debug("drift prompts not delivered: %s", exc)

    def _apply_batch_options(self, options: ModelOptions) -> None:
        """Step batching: start the replica's scheduler, or give it the new settings (read afresh
        by every iteration; images in flight keep their state). Switching to request batching
        leaves it running idle, so images already in it finish."""
        if options.batching != "step":
            return
        config = options.step_config()
        if self._batcher is None:
            from budgetdiff.generation.continuous import StepBatcher

            self._batcher = StepBatcher(config)
            self._batcher.observers.append(self._on_step_event)
            self._batcher.start()
        else:
            self._batcher.config = config

    def _on_step_event(self, event: str, data: dict) -> None:
        """The step scheduler's observer (its loop thread): hand the values over, nothing else."""
        if event in ("call", "queue_delay"):
            self._step_events.append((event, data))

    def flush_step_events(self) -> int:
        """Move the step scheduler's call and queue-delay events into the metrics sink and set the
        in-flight gauge (the replica's event loop calls it after every call and periodically)."""
        n = 0
        while True:
            try:
                event, data = self._step_events.popleft()
            except IndexError:
                break
            n += 1
            if event == "call":
                self.metrics.observe("budgetdiff_unet_call_rows", data["rows"], {"model": data["model"]})
                self.metrics.observe("budgetdiff_batch_images", data["images"], {})
            else:
                self.metrics.observe("budgetdiff_step_queue_delay_ms", data["seconds"] * 1000.0,
                                     {"mode": data["mode"]})
        if self._batcher is not None:
            stats = self._batcher.stats()
            self.metrics.set("budgetdiff_inflight_images", stats["in_flight"])
        return n

    def close(self) -> None:
        """Stop the step scheduler's thread (a replica shutting down)."""
        if self._batcher is not None:
            self._batcher.stop(timeout=1.0)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def check_health(self) -> None:
        if self._served is None:
            raise RuntimeError("no model loaded yet")

    async def info(self) -> dict:
        if self._served is None:
            raise ModelCallError(503, "the model is loading", None, "model_loading")
        return {**self._served.describe(), **self._options.batching_record(), "swaps": self.swaps,
                "replica": self._replica_id(),
                "batcher": self._batcher.stats() if self._batcher is not None else None,
                "shadow": dict(self.sampler.counts, depth=self.sampler.depth,
                               rate=self.sampler.rate) if self.sampler is not None else None,
                "pid": os.getpid(), "cpu_s": round(time.process_time(), 3)}  # this replica's CPU time

    def _replica_id(self) -> str | None:
        return None

    # -- generation -------------------------------------------------------------------------
    def _jobs(self, served: ServedModel, requests: list, size: str | None) -> list[ImageJob]:
        """One job per request, after checking what this model supports (the requests' own fields
        were validated where they were made: the ingress)."""
        from budgetdiff.errors import RequestError

        if size is not None and size != "auto" and size not in served.native_sizes:
            raise ModelCallError(400, f"size: {size} is not supported; this model generates "
                                      f"{', '.join(served.native_sizes)} (or auto)", "size", "invalid_size")
        jobs = []
        for request in requests:
            try:
                served.generator.check_supported(request)
            except RequestError as exc:
                raise ModelCallError(422, str(exc), exc.field, "unsupported_by_model") from None
            jobs.append(ImageJob(served, request))
        return jobs

    async def generate(self, requests: list, size: str | None = None) -> dict:
        """One API request (its ``GenerationRequest``\\ s, one per image) -> ``{"model_version",
        "images": [...]}`` or ``{"error": {...}}``."""
        start = time.perf_counter()
        served = self._served
        if served is None:
            reply = ModelCallError(503, "the model is loading; retry shortly", None, "model_loading").to_dict()
        else:
            try:
                jobs = self._jobs(served, requests, size)
            except ModelCallError as exc:
                reply = exc.to_dict()
            else:
                self._queued(len(jobs))
                try:
                    images = await self._run(served, jobs)
                finally:
                    self._queued(-len(jobs))
                errors = [img for img in images if "error" in img]
                reply = errors[0] if errors else {"model_version": served.version, "images": images}
        latency = time.perf_counter() - start
        for observe in self.observers:
            try:
                observe(requests, reply, latency)
            except Exception:
                logger.exception("observer %r failed", observe)
        return reply

    def _queued(self, delta: int) -> None:
        self._pending_images += delta
        self.metrics.set("budgetdiff_queue_depth", self._pending_images)

    async def _run(self, served: ServedModel, jobs: list[ImageJob]) -> list[dict]:
        if self._options.batching == "step":
            return await self._run_step(served, jobs)
        return await self._run_request(served, jobs)

    async def _run_step(self, served: ServedModel, jobs: list[ImageJob]) -> list[dict]:
        """The call's images through the replica's step scheduler, on the generator they were
        checked against. Cancelled (the client went away, the ingress timed out): the ticket is
        cancelled, so its images leave at the next iteration and free their rows."""
        from budgetdiff.generation.continuous import QueueFullError
        from budgetdiff.errors import RequestError

        loop = asyncio.get_running_loop()
        # planning may run the budget predictor: off the event loop
        submitting = loop.run_in_executor(None, self._batcher.submit, served.generator,
                                          [job.request for job in jobs], "pil")
        try:
            ticket = await asyncio.shield(submitting)
        except asyncio.CancelledError:
            submitting.add_done_callback(
                lambda f: None if f.cancelled() or f.exception() is not None else f.result().cancel())
            raise
        except QueueFullError as exc:
            err = ModelCallError(503, f"the service is at capacity ({exc}); retry after the Retry-After delay",
                                 None, "queue_full").to_dict()
            return [err] * len(jobs)
        except RequestError as exc:  # checked before; a bug if it happens
            return [ModelCallError(422, str(exc), exc.field, "invalid_request").to_dict()] * len(jobs)
        try:
            results = await asyncio.wrap_future(ticket.future)
        except asyncio.CancelledError:
            ticket.cancel()
            raise
        except Exception as exc:
            logger.exception("generation failed")
            err = ModelCallError(500, f"generation failed: {type(exc).__name__}: {exc}", None,
                                 "generation_failed").to_dict()
            return [err] * len(jobs)
        finally:
            self.flush_step_events()
        return await asyncio.to_thread(lambda: [step_reply(job, r) for job, r in zip(jobs, results)])

    async def _run_request(self, served: ServedModel, jobs: list[ImageJob]) -> list[dict]:
        raise NotImplementedError


class LocalImageModel(ImageModelBase):
    """``ImageModel`` in the current process (no Ray); under request batching a call's images run
    as one batch."""

    async def _run_request(self, served: ServedModel, jobs: list[ImageJob]) -> list[dict]:
        self.metrics.observe("budgetdiff_batch_images", len(jobs), {})
        return await asyncio.to_thread(run_jobs, jobs)


class ImageModel(ImageModelBase):
    """The Serve model deployment: images from concurrent requests share the replica's step
    scheduler (``batching: step``) or ``@serve.batch`` calls (``batching: request``;
    ``max_batch_size`` / ``batch_wait_timeout_s`` come from user_config); metrics go to Prometheus
    through ``ray.serve.metrics``."""

    def __init__(self, shadow=None):
        from monitoring.metrics import RayMetrics

        super().__init__(shadow=shadow, metrics=RayMetrics())

    async def _run_request(self, served: ServedModel, jobs: list[ImageJob]) -> list[dict]:
        return list(await asyncio.gather(*(self._batched(job) for job in jobs)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batched(self, jobs: list[ImageJob]) -> list[dict]:
        self.metrics.observe("budgetdiff_batch_images", len(jobs), {})
        return await asyncio.to_thread(run_jobs, jobs)

    def _replica_id(self) -> str | None:
        try:
            return serve.get_replica_context().replica_id.unique_id
        except Exception:
            return None

    def _apply_batch_options(self, options: ModelOptions) -> None:
        super()._apply_batch_options(options)
        self._batched.set_max_batch_size(options.max_batch_size)
        self._batched.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
