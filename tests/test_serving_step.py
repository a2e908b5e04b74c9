"""The model deployment's step-level batching (``batching: step``) and its request-level baseline,
without Ray: ``LocalImageModel`` on the tiny bundle, the ingress in-process (FastAPI TestClient)."""

from __future__ import annotations

import asyncio
import base64
import io
import time
import typing

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from budgetdiff.generation.engine import GenerationRequest  # noqa: E402
from serving.api import IngressState, LocalBackend, create_api  # noqa: E402
from serving.config import IngressOptions, validate_serve_config  # noqa: E402
from serving.model import LocalImageModel  # noqa: E402
from tests.test_serving import _edit, one_torch_thread  # noqa: E402,F401  (the fixture applies here too)

URL = "/v1/images/generations"
PROMPTS = ["a small red circle at the top left", "two blue squares at the bottom", "a green star in the center"]


def _model(bundle_dir, **extra) -> LocalImageModel:
    model = LocalImageModel()
    asyncio.run(model.reconfigure({"model_source": str(bundle_dir), "warmup": False, **extra}))
    return model


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def _calls() -> list[list[GenerationRequest]]:
    """Five API calls of mixed plans (modes, steps, schedulers, guidance, n)."""
    first = GenerationRequest(PROMPTS[0], mode="full", steps=6, seed=1)
    return [[first.for_image(i, f"a/{i}") for i in range(2)],
            [GenerationRequest(PROMPTS[1], mode="adaptive", steps=10, seed=3, scheduler="dpmpp")],
            [GenerationRequest(PROMPTS[2], mode="auto", seed=4)],
            [GenerationRequest(PROMPTS[0], mode="student", seed=5)],
            [GenerationRequest(PROMPTS[1], mode="full", steps=4, seed=6, guidance=1.0, scheduler="euler")]]


async def _concurrently(model, calls):
    return await asyncio.gather(*(model.generate(c) for c in calls))


@pytest.fixture(scope="module")
def step_model(tiny_bundle_dir):
    model = _model(tiny_bundle_dir)
    yield model
    model.close()


def test_step_batching_returns_the_images_of_the_generator_alone(step_model):
    assert step_model._options.batching == "step" and step_model._batcher is not None
    calls = _calls()
    replies = asyncio.run(_concurrently(step_model, calls))
    gen = step_model._served.generator
    shared = 0
    for call, reply in zip(calls, replies):
        assert "error" not in reply, reply
        for request, image in zip(call, reply["images"]):
            alone = gen([request], output_type="pil")[0]
            buf = io.BytesIO()
            alone.image.save(buf, format="PNG")
            diff = np.abs(_pixels(image["b64_json"]) - _pixels(base64.b64encode(buf.getvalue())))
            assert diff.max() <= 1, (request.mode, diff.max())  # same seed, same image, whatever it shared
            rec = image["record"]
            assert rec["batching"] == "step" and rec["nfe"] == alone.record.nfe
            assert rec["skip_mask"] == alone.record.skip_mask
            assert rec["queue_ms"] >= 0 and rec["batch_ms"] > 0 and rec["batch_images"] >= 1
            shared = max(shared, rec["batch_images"])
    assert shared >= 2  # images of different calls and plans shared UNet calls
    stats = step_model._batcher.stats()
    assert stats["in_flight"] == 0 and stats["waiting"] == 0 and stats["images_done"] >= 6


def test_step_metrics_reach_the_sink(step_model):
    asyncio.run(_concurrently(step_model, _calls()[:3]))
    step_model.flush_step_events()
    m = step_model.metrics
    rows = m.values("budgetdiff_unet_call_rows")
    assert rows and max(rows) <= 8 and set(m.values("budgetdiff_unet_call_rows", model="base")) <= set(rows)
    assert m.values("budgetdiff_unet_call_rows", model="student")  # the auto/student calls ran on the student
    assert len(m.values("budgetdiff_step_queue_delay_ms", mode="full")) >= 1
    assert m.values("budgetdiff_step_queue_delay_ms", mode="adaptive")
    assert m.gauge("budgetdiff_inflight_images") == 0
    assert m.values("budgetdiff_batch_images")  # images per UNet call under step batching
    assert m.values("budgetdiff_queue_wait_ms", mode="full")  # the per-image record's queue_ms, as before


def test_a_cancelled_call_frees_its_rows(step_model):
    """A call whose client went away (its task cancelled, as when the ingress times out) leaves
    the scheduler at the next iteration; a call sharing the scheduler finishes unchanged."""
    batcher = step_model._batcher
    before = batcher.stats()["cancelled_images"]
    rows_seen = []
    batcher.observers.append(lambda e, d: rows_seen.append(d["rows"]) if e == "call" else None)
    try:
        async def scenario():
            long = GenerationRequest(PROMPTS[1], mode="full", steps=500, seed=9)
            doomed = asyncio.create_task(step_model.generate([long.for_image(i, f"x/{i}") for i in range(3)]))
            for _ in range(400):  # until its three images denoise
                await asyncio.sleep(0.01)
                if batcher.stats()["in_flight"] == 3:
                    break
            assert batcher.stats()["in_flight"] == 3
            kept = asyncio.create_task(step_model.generate([GenerationRequest(PROMPTS[0], mode="full", steps=30,
                                                                              seed=2)]))
            await asyncio.sleep(0.05)
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            return await kept
        kept = asyncio.run(scenario())
    finally:
        batcher.observers.pop()
    assert "error" not in kept and kept["images"][0]["record"]["steps"] == 30
    assert batcher.stats()["cancelled_images"] - before == 3
    assert rows_seen[-1] == 2  # only the kept image's two rows were left
    assert batcher.stats()["in_flight"] == 0


def test_an_ingress_timeout_frees_the_rows_of_its_call(tiny_bundle_dir):
    model = _model(tiny_bundle_dir)
    try:
        client = TestClient(create_api(IngressState(LocalBackend(model), IngressOptions(request_timeout_s=0.3))))
        r = client.post(URL, json={"prompt": PROMPTS[0], "mode": "full", "steps": 1000, "n": 2})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        for _ in range(200):
            if model._batcher.stats()["in_flight"] == 0 and model._batcher.stats()["cancelled_images"] == 2:
                break
            time.sleep(0.02)
        assert model._batcher.stats()["cancelled_images"] == 2 and model._batcher.stats()["in_flight"] == 0
        assert model._batcher.stats()["images_done"] == 0
    finally:
        model.close()


def test_a_full_step_queue_is_refused_as_overload(tiny_bundle_dir):
    """Past step_max_queue waiting images a call gets ``queue_full``, which the ingress answers
    with its overload status and Retry-After, like Serve's own backpressure."""
    model = _model(tiny_bundle_dir, step_max_queue=10, step_max_inflight=2)
    model._batcher.stop()  # nothing is admitted while it is stopped: the queue fills deterministically
    try:
        async def scenario():
            first = GenerationRequest(PROMPTS[0], mode="full", steps=3, seed=1)
            waiting = asyncio.create_task(model.generate([first.for_image(i, f"w/{i}") for i in range(10)]))
            for _ in range(200):
                await asyncio.sleep(0.01)
                if model._batcher.stats()["waiting"] == 10:
                    break
            refused = await model.generate([GenerationRequest(PROMPTS[1], mode="full", steps=3, seed=2)])
            model._batcher.start()
            return refused, await waiting
        refused, served = asyncio.run(scenario())
    finally:
        model.close()
    assert refused["error"]["code"] == "queue_full" and refused["error"]["status"] == 503
    assert "error" not in served and len(served["images"]) == 10
    assert model.metrics.counter("budgetdiff_requests", status="queue_full") == 1

    class _FullModel:
        async def generate(self, requests, size=None):
            return refused

        async def info(self):
            return {"version": {"id": "bd-x"}, "sizes": ["16x16"], "modes": ["auto"]}

    for status in (503, 429):
        options = IngressOptions(overload_status=status, retry_after_s=3)
        r = TestClient(create_api(IngressState(LocalBackend(_FullModel()), options))).post(URL, json={"prompt": "a"})
        assert r.status_code == status and r.headers["Retry-After"] == "3"
        assert r.json()["error"]["code"] == ("overloaded" if status == 503 else "rate_limit_exceeded")


def test_request_level_batching_still_works_and_agrees(tiny_bundle_dir, step_model):
    model = _model(tiny_bundle_dir, batching="request")
    assert model._batcher is None
    calls = _calls()
    request_level = asyncio.run(_concurrently(model, calls))
    step_level = asyncio.run(_concurrently(step_model, calls))
    for a, b in zip(request_level, step_level):
        assert "error" not in a
        for x, y in zip(a["images"], b["images"]):
            assert x["record"]["batching"] == "request" and x["record"]["batch_images"] >= 1
            assert np.abs(_pixels(x["b64_json"]) - _pixels(y["b64_json"])).max() <= 1
            assert x["record"]["nfe"] == y["record"]["nfe"]
    info = asyncio.run(model.info())
    assert info["batching"] == "request" and info["max_batch_size"] == 8
    # switched to step batching in place: the same model, a scheduler started
    asyncio.run(model.reconfigure({"model_source": str(tiny_bundle_dir), "warmup": False, "batching": "step",
                                   "step_max_rows": 4}))
    try:
        assert model.swaps == 0 and model._batcher is not None and model._batcher.config.max_rows == 4
        info = asyncio.run(model.info())
        assert info["batching"] == "step" and info["max_rows"] == 4 and info["batcher"]["in_flight"] == 0
        reply = asyncio.run(model.generate(calls[0]))
        assert [i["record"]["batching"] for i in reply["images"]] == ["step", "step"]
    finally:
        model.close()


@pytest.mark.parametrize("key,value,message", [
    ("batching", "token", r"user_config\.batching: must be one of step, request"),
    ("step_max_rows", 1, r"user_config\.step_max_rows: must be >= 2"),
    ("step_max_rows", 2.5, r"user_config\.step_max_rows: must be an integer"),
    ("step_max_inflight", 0, r"user_config\.step_max_inflight: must be >= 1"),
    ("step_max_queue", 5, r"user_config\.step_max_queue: must be >= 10"),
    ("step_policy", "lifo", r"user_config\.step_policy: must be one of srpt, fifo"),
    ("step_latency_slack", -0.1, r"user_config\.step_latency_slack: must be >= 0"),
    ("step_latency_slack", "big", r"user_config\.step_latency_slack: must be a number"),
    ("step_short_steps", 0, r"user_config\.step_short_steps: must be >= 1"),
    ("step_max_wait_iterations", 0, r"user_config\.step_max_wait_iterations: must be >= 1"),
    ("step_max_row", 4, r"user_config\.step_max_row: unknown key \(did you mean step_max_rows\?\)"),
    ("step_max_inflight", 64, r"\(ImageModel\)\.max_ongoing_requests: 16 < user_config\.step_max_inflight 64"),
])
def test_step_keys_are_validated_with_one_line_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=message) as err:
        validate_serve_config(_edit(f"applications.0.deployments.1.user_config.{key}", value))
    assert "\n" not in str(err.value)


def test_null_slack_and_queue_are_valid_and_request_batching_checks_its_own_limit():
    config = _edit("applications.0.deployments.1.user_config.step_latency_slack", None)
    config["applications"][0]["deployments"][1]["user_config"]["step_max_queue"] = None
    validate_serve_config(config)
    config = _edit("applications.0.deployments.1.user_config.batching", "request")
    config["applications"][0]["deployments"][1]["user_config"]["step_max_inflight"] = 64  # unused then
    validate_serve_config(config)
    config["applications"][0]["deployments"][1]["max_ongoing_requests"] = 4
    with pytest.raises(ValueError, match=r"max_ongoing_requests: 4 < user_config\.max_batch_size 8"):
        validate_serve_config(config)


def test_the_mixed_bench_trace_is_reproducible_and_scaled():
    from benchmarks.bench_serve import MIX_BODIES, BenchServeConfig, Burst, MixKind, mixed_trace, scaled_mixed
    from mlops.params import load_config

    mix = {"auto": 0.6, "full50": 0.2, "adaptive50": 0.1, "student": 0.1}
    trace = mixed_trace(mix, 2.0, 200.0, Burst(at_s=10, requests=5), seed=3)
    assert trace == mixed_trace(mix, 2.0, 200.0, Burst(at_s=10, requests=5), seed=3)  # same trace for both batchings
    assert [t for t, _ in trace] == sorted(t for t, _ in trace) and sum(t == 10 for t, _ in trace) >= 5
    assert 300 < len(trace) < 500  # Poisson at 2/s over 200 s, plus the burst
    shares = {k: sum(kind == k for _, kind in trace) / len(trace) for k in mix}
    assert all(abs(shares[k] - mix[k]) < 0.07 for k in mix), shares
    mx = load_config("bench_serve", BenchServeConfig).mixed
    small = scaled_mixed(mx, 0.25)
    assert small.duration_s == mx.duration_s * 0.25 and small.burst.at_s == mx.burst.at_s * 0.25
    assert small.probe.repeats >= 1 and small.alone_requests == max(1, round(mx.alone_requests * 0.25))
    assert (small.mix, small.loads, small.targets) == (mx.mix, mx.loads, mx.targets)
    assert set(typing.get_args(MixKind)) == set(MIX_BODIES)  # params may name only the kinds a body exists for
    assert mx.target_load in mx.loads


def test_the_short_p95_floor_counts_the_burst_that_must_share_the_device():
    """The floor of the short requests' p95: alone latency for each, except the burst's short
    requests, batched (measured) or one after another (modelled), whichever gives the lower p95."""
    from benchmarks.bench_serve import BenchServeConfig, mixed_trace, short_p95_floor
    from mlops.params import load_config

    mx = load_config("bench_serve", BenchServeConfig).mixed
    capacity = 0.5126
    trace = mixed_trace(dict(mx.mix), mx.target_load * capacity, mx.duration_s, mx.burst,
                        mx.seed + int(round(mx.target_load * 100)))
    burst = [k for t, k in trace if t == mx.burst.at_s and k in ("auto", "student")]
    assert burst == ["auto", "auto"]  # params.yaml's trace at 80 %: two autos arrive together
    n_auto = sum(k == "auto" for _, k in trace)
    alone = {"auto": 1.0, "student": 2.0}
    # the pair measured at 1.8 s and 1.9 s together: the p95 of six 1.0 s and those two
    together = {"runs": [[{"kind": "auto", "latency_s": 1.8}, {"kind": "auto", "latency_s": 1.9}],
                         [{"kind": "auto", "latency_s": 1.8}, {"kind": "auto", "latency_s": 1.9}]]}
    floor = short_p95_floor(mx, capacity, alone, together)
    expected_batched = float(np.percentile([1.0] * (n_auto - 2) + [1.8, 1.9], 95))
    expected_serial = float(np.percentile([1.0] * (n_auto - 2) + [1.0, 2.0], 95))
    assert floor["auto"]["p95_batched_s"] == pytest.approx(expected_batched, abs=1e-3)
    assert floor["auto"]["p95_serial_model_s"] == pytest.approx(expected_serial, abs=1e-3)
    assert floor["auto"]["floor_p95_vs_alone"] == pytest.approx(min(expected_batched, expected_serial), abs=1e-3)
    assert floor["auto"]["floor_p95_vs_alone"] > 1.5  # on such a device the 1.5x target is out of reach
    assert floor["student"]["in_burst"] == 0 and floor["student"]["floor_p95_vs_alone"] == 1.0
