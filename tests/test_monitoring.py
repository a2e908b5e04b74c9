"""Monitoring: metric names and labels, the shadow sampler's bound and drop count, the per-request
quality SLO arithmetic, the shadow evaluator on the tiny components, and the shadow's config."""

import asyncio
import base64
import math

import pytest

from monitoring.metrics import MemoryMetrics, observe_call
from monitoring.names import BY_NAME, SPECS, exported_names
from monitoring.shadow import ShadowJob, ShadowSampler, is_good, jobs_from_reply, slo_summary

PROMPT = "a small red circle at the top left on a blue background"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------
# Names and the sink
# ------------------------------------------------------------------------------------------
def test_metric_table_is_consistent():
    names = [s.name for s in SPECS]
    assert len(names) == len(set(names))
    for spec in SPECS:
        assert spec.name.startswith("budgetdiff_") and spec.kind in ("counter", "gauge", "histogram")
        assert (spec.kind == "histogram") == bool(spec.boundaries), spec.name
        assert list(spec.boundaries) == sorted(spec.boundaries)
    assert "ray_budgetdiff_requests_total" in exported_names()
    assert "ray_budgetdiff_request_latency_ms_bucket" in exported_names()
    assert "ray_budgetdiff_queue_depth" in exported_names()
    # diffusion-scale latency buckets: seconds to minutes, not Serve's 2 s -> 5 s -> 10 s
    assert max(BY_NAME["budgetdiff_request_latency_ms"].boundaries) >= 120_000


def test_sink_rejects_unknown_names_wrong_kinds_and_tags():
    sink = MemoryMetrics()
    with pytest.raises(KeyError, match="not in monitoring.names"):
        sink.inc("budgetdiff_nope")
    with pytest.raises(TypeError, match="is a histogram"):
        sink.inc("budgetdiff_steps", 1, {"mode": "auto"})
    with pytest.raises(ValueError, match="takes tags"):
        sink.inc("budgetdiff_requests", 1, {"mode": "auto"})
    sink.inc("budgetdiff_requests", 1, {"mode": "auto", "status": "ok"})
    sink.observe("budgetdiff_steps", float("nan"), {"mode": "auto"})  # non-finite: ignored
    assert sink.counter("budgetdiff_requests", mode="auto") == 1
    assert sink.values("budgetdiff_steps") == []


def _requests(n=1, request_id="r", **fields):
    """The n engine requests of one API call (what the ingress sends to the model deployment)."""
    from budgetdiff.generation.engine import GenerationRequest

    first = GenerationRequest(fields.pop("prompt", PROMPT), **fields)
    return [first.for_image(i, f"{request_id}/{i}") for i in range(n)]


def _reply(n=2, steps=8, skipped=2, route="student"):
    images = [{"b64_json": "x", "record": {"seed": i, "steps": steps, "nfe": steps - skipped, "skipped": skipped,
                                           "route": route, "unet_gflops": 1.5, "queue_ms": 12.0, "scheduler": "ddim",
                                           "budget": {"predicted_quality_min": 0.93}}} for i in range(n)]
    return {"model_version": {"id": "bd-1"}, "images": images}


def test_observe_call_exports_per_mode_and_per_image_series():
    sink = MemoryMetrics()
    observe_call(sink, _requests(2, mode="auto"), _reply(), 1.25)
    observe_call(sink, _requests(1, mode="full"),
                 {"error": {"status": 400, "code": "invalid_size", "message": "size"}}, 0.01)
    assert sink.counter("budgetdiff_requests", mode="auto", status="ok") == 1
    assert sink.counter("budgetdiff_requests", mode="full", status="invalid_size") == 1
    assert sink.values("budgetdiff_request_latency_ms", mode="auto") == [1250.0]
    assert sink.values("budgetdiff_steps", mode="auto") == [8, 8]
    assert sink.values("budgetdiff_nfe", mode="auto") == [6, 6]
    assert sink.values("budgetdiff_skip_ratio", mode="auto") == [0.25, 0.25]
    assert sink.counter("budgetdiff_unet_gflops", mode="auto") == pytest.approx(3.0)
    assert sink.counter("budgetdiff_images", mode="auto", route="student") == 2
    assert sink.values("budgetdiff_predicted_quality", mode="auto") == [0.93, 0.93]
    assert sink.values("budgetdiff_steps", mode="full") == []  # errors carry no images


def test_local_model_exports_metrics_for_real_calls(tiny_bundle_dir):
    from serving.model import LocalImageModel

    model = LocalImageModel()

    async def run():
        await model.reconfigure({"model_source": str(tiny_bundle_dir), "warmup": False})
        ok = await model.generate(_requests(2, mode="full", steps=3, seed=1))
        bad = await model.generate(_requests(1, mode="full", steps=3), size="7x7")
        return ok, bad

    ok, bad = asyncio.run(run())
    assert "images" in ok and "error" in bad
    m = model.metrics
    assert m.counter("budgetdiff_requests", mode="full", status="ok") == 1
    assert m.counter("budgetdiff_requests", mode="full", status="invalid_size") == 1
    assert m.values("budgetdiff_steps", mode="full") == [3, 3]
    assert m.values("budgetdiff_batch_images") == [2, 2, 2]  # step batching: both images in each of 3 UNet calls
    assert m.values("budgetdiff_unet_call_rows", model="base") == [4, 4, 4]  # two guided images: 4 rows
    assert len(m.values("budgetdiff_step_queue_delay_ms", mode="full")) == 1 and m.gauge("budgetdiff_inflight_images") == 0
    assert m.gauge("budgetdiff_queue_depth") == 0
    assert m.gauge("budgetdiff_model_info", model_version=ok["model_version"]["id"]) == 1
    assert len(m.values("budgetdiff_request_latency_ms", mode="full")) == 2


# ------------------------------------------------------------------------------------------
# The sampler: rate, bound, drops
# ------------------------------------------------------------------------------------------
def test_sampler_queue_is_bounded_and_drops_are_counted():
    sink, sent, gate = MemoryMetrics(), [], None

    async def send(job):
        await gate.wait()
        sent.append(job)

    async def run():
        nonlocal gate
        gate = asyncio.Event()
        sampler = ShadowSampler(1.0, queue_size=2, send=send, sink=sink, max_in_flight=1)
        queued = sampler.offer(_requests(5, mode="auto"), _reply(n=5))
        assert queued == 2 and sampler.depth == 2
        assert sink.counter("budgetdiff_shadow_sampled", outcome="dropped") == 3
        assert sink.gauge("budgetdiff_shadow_queue_depth") == 2
        for _ in range(200):  # the worker takes one job and waits in send
            if sampler.depth == 1:
                break
            await asyncio.sleep(0.01)
        assert sampler.depth == 1
        gate.set()
        for _ in range(100):
            if len(sent) == 2:
                break
            await asyncio.sleep(0.01)
        return sampler

    sampler = asyncio.run(run())
    assert len(sent) == 2 and sampler.counts["queued"] == 2 and sampler.counts["dropped"] == 3
    assert sink.counter("budgetdiff_shadow_sampled", outcome="queued") == 2
    assert [j.seed for j in sent] == [0, 1]


def test_sampler_counts_a_refused_job_as_dropped():
    sink = MemoryMetrics()

    async def send(job):
        raise RuntimeError("BackPressureError: the evaluator's queue is full")

    async def run():
        sampler = ShadowSampler(1.0, 8, send, sink)
        sampler.offer(_requests(3), _reply(n=3))
        for _ in range(100):
            if sampler.counts["failed"] == 3:
                break
            await asyncio.sleep(0.01)
        return sampler

    sampler = asyncio.run(run())
    assert sampler.counts["failed"] == 3
    assert sink.counter("budgetdiff_shadow_sampled", outcome="dropped") == 3


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5])
def test_sampling_rate_is_honoured(rate):
    sink = MemoryMetrics()

    async def send(job):
        pass

    async def run():
        sampler = ShadowSampler(rate, 100_000, send, sink, seed=3)
        requests = _requests(10)
        n = sum(sampler.offer(requests, _reply(n=10)) for _ in range(200))
        sampler._queue.clear()
        return n

    n = asyncio.run(run())
    expected, sd = 2000 * rate, math.sqrt(2000 * rate * (1 - rate))
    assert abs(n - expected) <= 4 * sd + (0 if rate else 0)


def test_sampler_rejects_a_bad_rate():
    with pytest.raises(ValueError, match="shadow_sample_rate"):
        ShadowSampler(1.5, 1, None, MemoryMetrics())


def test_jobs_carry_what_the_shadow_needs():
    call = _requests(2, mode="budget", quality_target=0.95, guidance=1.5)
    jobs = jobs_from_reply(call, _reply(n=2))
    assert [j.seed for j in jobs] == [0, 1]
    assert jobs[0].quality_target == 0.95 and jobs[0].guidance == 1.5 and jobs[0].mode == "budget"
    assert jobs[0].model_version == "bd-1" and jobs[0].scheduler == "ddim"
    assert jobs_from_reply(call, {"error": {"code": "x"}}) == []


# ------------------------------------------------------------------------------------------
# The per-request quality SLO
# ------------------------------------------------------------------------------------------
def test_slo_arithmetic():
    assert is_good(0.95, 0.95) and not is_good(0.949, 0.95) and is_good(None, 0.9) is None
    s = slo_summary([True] * 97 + [False] * 3, 0.95)
    assert s["share_good"] == 0.97 and s["met"] and s["n"] == 100
    assert s["error_budget_remaining"] == pytest.approx(1 - 0.03 / 0.05)
    lo, hi = s["share_good_ci95"]
    assert lo < 0.97 < hi and 0.9 < lo
    s = slo_summary([True] * 90 + [False] * 10 + [None] * 5, 0.95)
    assert s["share_good"] == 0.9 and not s["met"] and s["unscored"] == 5
    assert s["error_budget_remaining"] == pytest.approx(-1.0)  # spent twice over
    assert slo_summary([], 0.95)["share_good"] is None
    with pytest.raises(ValueError, match="objective"):
        slo_summary([True], 1.0)


# ------------------------------------------------------------------------------------------
# The evaluator on the tiny components
# ------------------------------------------------------------------------------------------
def _png_b64(image) -> str:
    from budgetdiff.io import png_bytes

    return base64.b64encode(png_bytes(image)).decode()


@pytest.fixture(scope="module")
def evaluator(tiny_generator):
    from budgetdiff.metrics import MetricScorer, ScoringConfig
    from monitoring.shadow import ShadowEvaluator, ShadowSettings

    scorer = MetricScorer(ScoringConfig(clip_dir="/nonexistent", attributes_dir="/nonexistent",
                                        skip_missing_models=True))
    settings = ShadowSettings(model_source="unused", clip_dir="/nonexistent", attributes_dir="/nonexistent",
                              reference_steps=6, default_quality_target=0.9, window=4)  # a service-wide default
    logged = []
    ev = ShadowEvaluator(settings, MemoryMetrics(), generator=tiny_generator, scorer=scorer,
                         log_batch=logged.append, log_every=2)
    ev.logged = logged
    return ev


def _served(gen, steps, seed=4, prompt=PROMPT):
    from budgetdiff.generation.engine import GenerationRequest

    return gen([GenerationRequest(prompt, mode="full", steps=steps, seed=seed)])[0].image


def test_shadow_judges_the_reference_itself_good_and_a_worse_image_by_its_quality(evaluator, tiny_generator):
    ref = _served(tiny_generator, 6)
    same = evaluator.evaluate(ShadowJob(PROMPT, "full", 4, None, None, 0.99, _png_b64(ref), "bd-1", {"steps": 6}))
    assert same["realised_quality"] > 0.99 and same["good"] is True and same["target_from"] == "request"
    assert same["levels"]["pixel/ssim"] > 0.99
    other = _served(tiny_generator, 6, seed=99)  # another seed: a different image
    worse = evaluator.evaluate(ShadowJob(PROMPT, "auto", 4, None, None, None, _png_b64(other), "bd-1", {"steps": 6}))
    assert worse["quality_target"] == 0.9 and worse["target_from"] == "service_default"
    assert worse["realised_quality"] < same["realised_quality"]
    assert worse["good"] == (worse["realised_quality"] >= 0.9)
    sink = evaluator.sink
    assert sink.counter("budgetdiff_shadow_evaluations", mode="full", slo="good") == 1
    assert sink.counter("budgetdiff_shadow_evaluations", mode="auto") == 1
    assert sink.gauge("budgetdiff_shadow_last_eval_timestamp_seconds") > 0
    assert sink.gauge("budgetdiff_shadow_score", metric="pixel/ssim") is not None
    assert len(sink.values("budgetdiff_realised_quality")) == 2
    if not worse["good"]:
        assert sink.values("budgetdiff_quality_shortfall", mode="auto")[0] == pytest.approx(
            0.9 - worse["realised_quality"])
    # batches of two go to the logger; the attribute parse outcome is recorded
    assert len(evaluator.logged) == 1 and len(evaluator.logged[0]) == 2
    assert "attr_parse_error" in same
    summary = evaluator.summary()
    assert summary["slo"]["n"] == 2 and summary["evaluated"] == 2


def test_shadow_scores_attr_acc_on_the_attributes_a_partial_prompt_states(tiny_generator):
    """A served prompt that leaves the size unstated is scored on what it states, exactly as
    `budgetdiff score` (MetricScorer with parse_stated_scene) scores it, and the verdict names what
    was scored; an unreadable prompt is recorded with the reason, not guessed."""
    from test_metrics_helpers import tiny_checker

    from budgetdiff.metrics import MetricScorer, ScoringConfig
    from monitoring.shadow import ShadowEvaluator, ShadowSettings

    scorer = MetricScorer(ScoringConfig(clip_dir="/nonexistent", attributes_dir="/nonexistent",
                                        skip_missing_models=True), checker=tiny_checker())
    settings = ShadowSettings(model_source="unused", clip_dir="/x", attributes_dir="/x", reference_steps=6)
    ev = ShadowEvaluator(settings, MemoryMetrics(), generator=tiny_generator, scorer=scorer)
    partial = "a red circle in the center on a white background"
    served = _served(tiny_generator, 3, prompt=partial)
    verdict = ev.evaluate(ShadowJob(partial, "full", 4, None, None, 0.5, _png_b64(served), "bd-1", {"steps": 3}))
    assert "error" not in verdict, verdict.get("error")
    expected = scorer.score_one(served, prompt=partial)["domain/attr_acc"]
    assert math.isfinite(expected) and verdict["levels"]["domain/attr_acc"] == pytest.approx(expected)
    assert verdict["attr_scored"] == {"objects": [{"object": "red circle in the center",
                                                   "attributes": ["color", "shape", "position", "texture"]}],
                                      "background": True}
    assert verdict["attr_parse_error"] is None and verdict["attr_skipped"] == []
    # a background colour outside the domain leaves the background unscored, not the prompt
    teal = "a small red circle in the center on a teal background"
    verdict = ev.evaluate(ShadowJob(teal, "full", 4, None, None, 0.5, _png_b64(served), "bd-1", {"steps": 3}))
    assert "domain/attr_acc" in verdict["levels"] and verdict["attr_scored"]["background"] is False
    assert any("teal" in s for s in verdict["attr_skipped"])
    unreadable = "a red dog chasing a blue cat"
    verdict = ev.evaluate(ShadowJob(unreadable, "full", 4, None, None, 0.5, _png_b64(served), "bd-1", {"steps": 3}))
    assert "domain/attr_acc" not in verdict["levels"] and verdict["attr_scored"] is None
    assert verdict["attr_parse_error"]


def test_shadow_counts_a_failed_evaluation(evaluator):
    before = evaluator.errors
    v = evaluator.evaluate(ShadowJob(PROMPT, "auto", 1, None, None, None, "not-a-png", "bd-1", {}))
    assert v["good"] is None and "error" in v and evaluator.errors == before + 1
    assert evaluator.sink.counter("budgetdiff_shadow_errors") >= 1


def test_model_replica_feeds_the_shadow_end_to_end(tiny_bundle_dir, evaluator):
    """LocalImageModel -> sampler -> a local shadow: every sampled image is evaluated."""
    from serving.model import LocalImageModel
    from serving.shadow import ShadowEvaluatorBase

    shadow = ShadowEvaluatorBase(metrics=evaluator.sink)
    shadow.core = evaluator
    model = LocalImageModel(shadow=shadow)
    before = evaluator.evaluated

    async def run():
        await model.reconfigure({"model_source": str(tiny_bundle_dir), "warmup": False,
                                 "shadow_sample_rate": 1.0, "shadow_queue_size": 4})
        await model.generate(_requests(2, request_id="e", mode="full", steps=3, seed=7))
        for _ in range(600):
            if model.sampler.counts["sent"] == 2:
                break
            await asyncio.sleep(0.05)

    asyncio.run(run())
    assert model.sampler.counts["sent"] == 2
    assert evaluator.evaluated == before + 2


# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------
def test_shadow_config_is_checked():
    from serving.config import CONFIG_DIR, ShadowOptions, load_serve_config, user_config, with_overrides

    cpu = load_serve_config(CONFIG_DIR / "cpu.yaml")
    assert user_config(cpu, "ImageModel").shadow_sample_rate == 0.1
    assert user_config(cpu, "ShadowEvaluator").objective == 0.95
    moved = with_overrides(cpu, model_source="/x/bundle")
    assert user_config(moved, "ShadowEvaluator").model_source == "/x/bundle"
    with pytest.raises(ValueError, match="exactly one replica"):
        with_overrides(cpu, deployments={"ShadowEvaluator": {"num_replicas": 2}})
    with pytest.raises(ValueError, match=r"ShadowEvaluator\)\.user_config\.objectiv: unknown key"):
        with_overrides(cpu, shadow={"objectiv": 0.9})
    with pytest.raises(ValueError, match="shadow_sample_rate"):
        with_overrides(cpu, model={"shadow_sample_rate": 2})
    with pytest.raises(ValueError, match="drift_window"):
        ShadowOptions.from_dict({"drift_window": 5})
    with pytest.raises(ValueError, match="num_gpus"):
        with_overrides(cpu, shadow={"device": "cuda"})


def test_gauges_are_refreshed_with_their_last_values():
    emitted = []

    class Spy(MemoryMetrics):
        def _emit(self, spec, op, value, tags):
            emitted.append((spec.name, op, value, tuple(sorted(tags.items()))))
            super()._emit(spec, op, value, tags)

    sink = Spy()
    sink.set("budgetdiff_shadow_last_eval_timestamp_seconds", 123.0)
    sink.set("budgetdiff_model_info", 1, {"model_version": "a"})
    sink.set("budgetdiff_model_info", 0, {"model_version": "a"})
    sink.inc("budgetdiff_requests", 1, {"mode": "auto", "status": "ok"})
    emitted.clear()
    assert sink.refresh_gauges() == 2
    assert sorted(emitted) == sorted([("budgetdiff_shadow_last_eval_timestamp_seconds", "set", 123.0, ()),
                                      ("budgetdiff_model_info", "set", 0.0, (("model_version", "a"),))])


def test_verdicts_are_logged_to_mlflow_in_batches(tmp_path, monkeypatch):
    import mlflow

    from monitoring.shadow import mlflow_batch_logger

    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    (tmp_path / "db").mkdir()
    monkeypatch.chdir(tmp_path)  # a replica's working directory: nothing may land there
    log = mlflow_batch_logger("shadow-test", tracking_uri=uri)
    verdicts = [{"good": i % 4 != 0, "realised_quality": 0.9 + 0.01 * i, "levels": {"pixel/ssim": 0.9}}
                for i in range(8)]
    log(verdicts[:4])
    log(verdicts[4:] + [{"good": None, "realised_quality": None, "error": "x"}])
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("shadow-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["component"] == "shadow"
    history = client.get_metric_history(runs[0].info.run_id, "shadow/share_good")
    assert [(m.step, m.value) for m in history] == [(4, 0.75), (9, 0.75)]
    artifacts = [a.path for a in client.list_artifacts(runs[0].info.run_id, "shadow")]
    assert artifacts == ["shadow/verdicts_00000004.json", "shadow/verdicts_00000009.json"]
    assert not (tmp_path / "mlruns").exists() and (tmp_path / "db" / "mlartifacts").is_dir()


def test_a_request_without_target_is_judged_by_its_routes_promise(tiny_generator):
    """default_quality_target None: an auto request is judged against the auto policy's promise for
    the route it ran; a request with nothing promised is unscored, not bad."""
    from dataclasses import replace

    from monitoring.shadow import ShadowEvaluator, ShadowSettings
    from test_auto_policy import synthetic_policy

    settings = ShadowSettings(model_source="unused", clip_dir="/x", attributes_dir="/x", reference_steps=6)
    ev = ShadowEvaluator.__new__(ShadowEvaluator)  # only target_for: no models needed
    ev.settings, ev.generator = settings, type("G", (), {"auto_policy": synthetic_policy()})()
    job = ShadowJob(PROMPT, "auto", 1, None, None, None, "", "bd-1", {"route": "budget q'0.9"})
    assert ev.target_for(job) == (0.9, "auto_route_promise")
    assert ev.target_for(replace(job, quality_target=0.5)) == (0.5, "request")
    assert ev.target_for(replace(job, record={"route": "reference"}))[0] > 0.999
    assert ev.target_for(replace(job, mode="full", record={})) == (None, "none")
    ev.settings = replace(settings, default_quality_target=0.8)
    assert ev.target_for(job) == (0.8, "service_default")
