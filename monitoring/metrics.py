"""Export the service's metrics (``monitoring.names.SPECS``) and turn one answered API call into
observations.

``MetricsSink`` is what the serving code talks to: ``inc`` / ``set`` / ``observe`` by spec name and
tags. ``RayMetrics`` backs it with ``ray.serve.metrics`` (created lazily inside a replica, so Ray
adds the deployment/replica/application tags); ``MemoryMetrics`` keeps everything in dicts for
tests and for in-process runs without Ray. ``observe_call`` is the model deployment's observer.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict

from .names import BY_NAME, MetricSpec


class MetricsSink:
    """Named metrics with checked tags. Subclasses implement ``_emit``."""

    def _spec(self, name: str, kind: str, tags: dict | None) -> MetricSpec:
        spec = BY_NAME.get(name)
        if spec is None:
            raise KeyError(f"metric {name!r} is not in monitoring.names.SPECS")
        if spec.kind != kind:
            raise TypeError(f"metric {name!r} is a {spec.kind}, not a {kind}")
        if set(tags or {}) != set(spec.tags):
            raise ValueError(f"metric {name!r} takes tags {spec.tags}, got {tuple(tags or {})}")
        return spec

    def inc(self, name: str, value: float = 1.0, tags: dict | None = None) -> None:
        spec = self._spec(name, "counter", tags)
        if value > 0:
            self._emit(spec, "inc", float(value), _str_tags(tags))

    def set(self, name: str, value: float, tags: dict | None = None) -> None:
        spec = self._spec(name, "gauge", tags)
        if value is not None and math.isfinite(float(value)):
            t = _str_tags(tags)
            self._last_gauges()[(name, tuple(sorted(t.items())))] = float(value)
            self._emit(spec, "set", float(value), t)

    def _last_gauges(self) -> dict:
        if not hasattr(self, "_gauge_values"):
            self._gauge_values = {}
        return self._gauge_values

    def refresh_gauges(self) -> int:
        """Set every gauge again to its last value. Ray drops a gauge series a few report
        intervals after its last ``set``; a replica calls this every few seconds so that a quiet
        gauge (the shadow's last-evaluation time, the drift p-values) stays visible."""
        items = list(self._last_gauges().items())
        for (name, tags), value in items:
            self._emit(BY_NAME[name], "set", value, dict(tags))
        return len(items)

    def observe(self, name: str, value: float, tags: dict | None = None) -> None:
        spec = self._spec(name, "histogram", tags)
        if value is not None and math.isfinite(float(value)):
            self._emit(spec, "observe", float(value), _str_tags(tags))

    def _emit(self, spec: MetricSpec, op: str, value: float, tags: dict) -> None:
        raise NotImplementedError


def _str_tags(tags: dict | None) -> dict:
    return {k: "none" if v is None else str(v) for k, v in (tags or {}).items()}


class MemoryMetrics(MetricsSink):
    """In-memory sink: ``counters[(name, tags)]``, ``gauges[(name, tags)]``, ``histograms[(name, tags)]``
    (a list of observed values); tags as a sorted tuple of items."""

    def __init__(self):
        self.counters: dict = defaultdict(float)
        self.gauges: dict = {}
        self.histograms: dict = defaultdict(list)
        self._lock = threading.Lock()

    def _emit(self, spec, op, value, tags):
        key = (spec.name, tuple(sorted(tags.items())))
        with self._lock:
            if op == "inc":
                self.counters[key] += value
            elif op == "set":
                self.gauges[key] = value
            else:
                self.histograms[key].append(value)

    def counter(self, name: str, **tags) -> float:
        """Sum of a counter over every series whose tags include ``tags``."""
        return sum(v for (n, t), v in self.counters.items() if n == name and tags.items() <= dict(t).items())

    def values(self, name: str, **tags) -> list[float]:
        """Every value a histogram observed, over series whose tags include ``tags``."""
        return [x for (n, t), vs in self.histograms.items() if n == name and tags.items() <= dict(t).items()
                for x in vs]

    def gauge(self, name: str, **tags) -> float | None:
        for (n, t), v in self.gauges.items():
            if n == name and tags.items() <= dict(t).items():
                return v
        return None


class RayMetrics(MetricsSink):
    """``ray.serve.metrics`` objects, created on first use in the process that emits them."""

    def __init__(self):
        self._objects: dict = {}
        self._lock = threading.Lock()

    def _object(self, spec: MetricSpec):
        obj = self._objects.get(spec.name)
        if obj is None:
            from ray.serve import metrics

            with self._lock:
                obj = self._objects.get(spec.name)
                if obj is None:
                    if spec.kind == "counter":
                        obj = metrics.Counter(spec.name, spec.description, tag_keys=spec.tags)
                    elif spec.kind == "gauge":
                        obj = metrics.Gauge(spec.name, spec.description, tag_keys=spec.tags)
                    else:
                        obj = metrics.Histogram(spec.name, spec.description, boundaries=list(spec.boundaries),
                                                tag_keys=spec.tags)
                    self._objects[spec.name] = obj
        return obj

    def _emit(self, spec, op, value, tags):
        getattr(self._object(spec), op)(value, tags=tags or None)


def call_status(reply: dict) -> str:
    """``ok`` or the error code of a model reply (``model_loading``, ``invalid_size``, ...)."""
    if "error" in reply:
        err = reply["error"]
        return str(err.get("code") or err.get("status") or "error")
    return "ok"


def observe_call(sink: MetricsSink, requests: list, reply: dict, latency_s: float) -> None:
    """Record one answered call (its ``GenerationRequest``\\ s, one per image, and the model's
    reply): the request counter and latency, and per image its steps, NFE, skip ratio, GFLOPs,
    queue wait, route and the budget predictor's predicted quality."""
    mode = requests[0].mode if requests else "auto"
    status = call_status(reply)
    sink.inc("budgetdiff_requests", 1, {"mode": mode, "status": status})
    sink.observe("budgetdiff_request_latency_ms", latency_s * 1000.0, {"mode": mode})
    if status != "ok":
        return
    for image in reply.get("images") or []:
        rec = image.get("record") or {}
        sink.inc("budgetdiff_images", 1, {"mode": mode, "route": rec.get("route") or rec.get("model") or "none"})
        steps, nfe = rec.get("steps"), rec.get("nfe")
        if steps:
            sink.observe("budgetdiff_steps", steps, {"mode": mode})
            skipped = rec.get("skipped")
            if skipped is not None:
                sink.observe("budgetdiff_skip_ratio", skipped / steps, {"mode": mode})
        if nfe is not None:
            sink.observe("budgetdiff_nfe", nfe, {"mode": mode})
        if rec.get("unet_gflops") is not None:
            sink.inc("budgetdiff_unet_gflops", rec["unet_gflops"], {"mode": mode})
        if rec.get("queue_ms") is not None:
            sink.observe("budgetdiff_queue_wait_ms", rec["queue_ms"], {"mode": mode})
        predicted = (rec.get("budget") or {}).get("predicted_quality_min")
        if predicted is not None:
            sink.observe("budgetdiff_predicted_quality", predicted, {"mode": mode})
