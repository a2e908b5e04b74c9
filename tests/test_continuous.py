"""budgetdiff.generation.continuous: step-level continuous batching (batch invariance, joins and leaves,
cancellation, timeouts, model swaps, the row budget and the latency-aware policy)."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np
import pytest

from budgetdiff.methods.adaptive import AdaptiveSkipConfig
from budgetdiff.generation.continuous import CostModel, QueueFullError, StepBatchConfig, StepBatcher
from budgetdiff.generation.engine import GenerationRequest, Generator

PROMPTS = ["a small red circle at the top left on a white background",
           "a large blue square in the center and a small green triangle at the bottom right on a black background",
           "a medium yellow star at the bottom left on a gray background"]
# On [0, 1] pixels, a quarter of one 8-bit level: batched kernels reassociate sums. The random
# tiny UNet amplifies that more than a trained one (up to 2.5e-4 here at 5 Euler steps; about 3e-6
# on the embedded model, benchmarks/bench_serve.py reports it).
ATOL = 1e-3
SKIP = AdaptiveSkipConfig(threshold=0.5, max_skip=2, warmup=4)


def alone(gen: Generator, request: GenerationRequest) -> tuple[np.ndarray, list | None]:
    """The request through the plain diffusers pipeline call, by itself: the reference."""
    plan = gen.plan([request])[0]
    out = gen.models[plan.model].pipe([request.prompt], num_inference_steps=plan.steps, guidance_scale=plan.guidance,
                                      scheduler=plan.scheduler, seed=[request.seed], output_type="np",
                                      progress=False, adaptive=plan.skip)
    return out.images[0], out.records[0].get("skip_mask")


def mixed_requests() -> list[GenerationRequest]:
    """Every scheduler, guided and unguided, skipping and not, both models, several step counts."""
    reqs = []
    for i, sched in enumerate(("ddim", "dpmpp", "euler")):
        reqs.append(GenerationRequest(PROMPTS[i], mode="full", steps=7 + 3 * i, scheduler=sched, seed=i))
        reqs.append(GenerationRequest(PROMPTS[i - 1], mode="full", steps=5 + i, scheduler=sched, guidance=1.0,
                                      seed=10 + i))
        reqs.append(GenerationRequest(PROMPTS[i - 2], mode="adaptive", steps=14, scheduler=sched, skip=SKIP,
                                      seed=20 + i))
    reqs.append(GenerationRequest(PROMPTS[0], mode="student", seed=30))
    return reqs


def check_against_alone(gen, requests, results):
    for r, res in zip(requests, results):
        image, mask = alone(gen, r)
        assert np.abs(np.asarray(res.image) - image).max() <= ATOL, (r.mode, r.scheduler, r.steps)
        assert res.record.skip_mask == mask, (r.mode, r.scheduler)
        assert res.record.nfe == res.record.steps - sum(mask or [])


def test_batch_invariance_for_every_scheduler_guidance_and_skipping(tiny_generator):
    requests = mixed_requests()
    batcher = StepBatcher(StepBatchConfig(max_rows=8, max_inflight=6))
    calls = []
    batcher.observers.append(lambda e, d: calls.append(d) if e == "call" else None)
    results = tiny_generator.run_batched(batcher, requests, "np")
    check_against_alone(tiny_generator, requests, results)
    assert any(r.record.skipped for r in results)  # the skipping path was exercised
    assert max(c["rows"] for c in calls) <= 8
    assert max(c["images"] for c in calls) > 2  # plans of different schedulers and steps shared calls
    stats = batcher.stats()
    assert stats["images_done"] == len(requests) and stats["in_flight"] == 0 and stats["waiting"] == 0
    assert stats["skipped_steps"] == sum(r.record.skipped for r in results)


def test_requests_join_and_leave_at_every_step(tiny_generator):
    """A long request runs while a new short one joins after every iteration; each image equals
    its request alone, and a short one leaves as soon as it is done."""
    batcher = StepBatcher(StepBatchConfig(max_rows=16, max_inflight=16))
    long = GenerationRequest(PROMPTS[1], mode="adaptive", steps=12, scheduler="dpmpp", skip=SKIP, seed=5)
    tickets = [(long, batcher.submit(tiny_generator, [long], "np"))]
    k = 0
    while not batcher.idle():
        batcher.step()
        if k < 11:
            sched = ("ddim", "euler", "dpmpp")[k % 3]
            r = GenerationRequest(PROMPTS[k % 3], mode="full", steps=3 + k % 4, scheduler=sched, seed=100 + k,
                                  guidance=1.0 if k % 2 else None)
            tickets.append((r, batcher.submit(tiny_generator, [r], "np")))
        k += 1
    for r, t in tickets:
        check_against_alone(tiny_generator, [r], t.future.result(timeout=0))
    # a 3-step request submitted at iteration i finished 3 iterations later: nobody waited for the long one
    assert all(t.future.result()[0].record.latency_seconds < tickets[0][1].future.result()[0].record.latency_seconds
               for _, t in tickets[1:4])


def test_a_cancelled_or_timed_out_request_frees_its_rows(tiny_generator):
    batcher = StepBatcher(StepBatchConfig(max_rows=16, max_inflight=16))
    calls = []
    batcher.observers.append(lambda e, d: calls.append(d["rows"]) if e == "call" else None)
    gone = batcher.submit(tiny_generator, [GenerationRequest(PROMPTS[0], mode="full", steps=20, seed=s)
                                           for s in range(3)], "np")
    late = batcher.submit(tiny_generator, [GenerationRequest(PROMPTS[1], mode="full", steps=20, seed=9)], "np",
                          timeout_s=3600)
    keep = GenerationRequest(PROMPTS[2], mode="full", steps=20, seed=7)
    kept = batcher.submit(tiny_generator, [keep], "np")
    for _ in range(3):
        batcher.step()
    assert calls[-1] == 2 * 5  # five guided images in flight
    assert gone.cancel()
    late.deadline = time.perf_counter() - 1  # its deadline passes mid-denoise
    batcher.step()
    assert calls[-1] == 2  # only the kept request's rows remain
    assert batcher.stats()["in_flight"] == 1
    batcher.run_until_idle()
    with pytest.raises(concurrent.futures.CancelledError):
        gone.future.result(timeout=0)
    with pytest.raises(TimeoutError, match="timeout: .*1 of 1 images unfinished"):
        late.future.result(timeout=0)
    assert batcher.stats()["cancelled_images"] == 3 and batcher.stats()["timed_out_images"] == 1
    check_against_alone(tiny_generator, [keep], kept.future.result(timeout=0))


def test_a_model_swap_finishes_in_flight_requests_on_their_model(tiny_generator, tiny_bundle_dir):
    """Two generators (the old and the new model) in one scheduler: each image is made by the model
    it was planned on, and both kinds share iterations but never a UNet call."""
    other = Generator.from_bundle(tiny_bundle_dir, model=tiny_bundle_dir.parent / "student", device="cpu")
    batcher = StepBatcher(StepBatchConfig(max_rows=16, max_inflight=16))
    calls = []
    batcher.observers.append(lambda e, d: calls.append(d) if e == "call" else None)
    r_old = GenerationRequest(PROMPTS[0], mode="full", steps=10, seed=3)
    t_old = batcher.submit(tiny_generator, [r_old], "np")
    batcher.step()
    batcher.step()
    r_new = GenerationRequest(PROMPTS[0], mode="full", steps=10, seed=3)
    t_new = batcher.submit(other, [r_new], "np")
    batcher.run_until_idle()
    old, new = t_old.future.result()[0], t_new.future.result()[0]
    check_against_alone(tiny_generator, [r_old], [old])
    check_against_alone(other, [r_new], [new])
    assert old.record.model.path != new.record.model.path
    assert np.abs(np.asarray(old.image) - np.asarray(new.image)).max() > 1e-3
    assert max(c["images"] for c in calls) == 1  # different UNets never share a call


def test_srpt_with_latency_slack_lets_a_short_request_pass_a_long_one(tiny_generator):
    """A 4-step request that joins while a 4-image 30-step request runs: with SRPT and zero slack
    it takes the calls alone and finishes in 4 iterations; the long one still finishes, unchanged."""
    batcher = StepBatcher(StepBatchConfig(max_rows=8, max_inflight=8, policy="srpt", latency_slack=0.0,
                                          short_steps=8, max_wait_iterations=8))
    calls = []
    batcher.observers.append(lambda e, d: calls.append(d) if e == "call" else None)
    longs = [GenerationRequest(PROMPTS[1], mode="full", steps=30, seed=s) for s in range(4)]
    t_long = batcher.submit(tiny_generator, longs, "np")
    for _ in range(3):
        batcher.step()
    short = GenerationRequest(PROMPTS[0], mode="full", steps=4, seed=50)
    t_short = batcher.submit(tiny_generator, [short], "np")
    start = len(calls)
    while not t_short.done():
        batcher.step()
    assert len(calls) - start == 4 and all(c["images"] == 1 for c in calls[start:])
    batcher.run_until_idle()
    check_against_alone(tiny_generator, [short], t_short.future.result())
    check_against_alone(tiny_generator, longs, t_long.future.result())


def test_the_starvation_guard_moves_a_long_request_under_a_stream_of_short_ones(tiny_generator):
    batcher = StepBatcher(StepBatchConfig(max_rows=2, max_inflight=8, policy="srpt", latency_slack=0.0,
                                          short_steps=8, max_wait_iterations=3))
    long = batcher.submit(tiny_generator, [GenerationRequest(PROMPTS[1], mode="full", steps=6, seed=1)], "np")
    for k in range(40):  # a new 2-step request every iteration: alone, the long one would never run
        batcher.submit(tiny_generator, [GenerationRequest(PROMPTS[0], mode="full", steps=2, seed=k)], "np")
        batcher.step()
        if long.done():
            break
    assert long.done(), "the long request starved"


def test_the_background_loop_serves_threads(tiny_generator):
    batcher = StepBatcher(StepBatchConfig(max_rows=8, max_inflight=8)).start()
    try:
        requests = mixed_requests()[:6]
        results: dict[int, list] = {}

        def work(k):
            results[k] = batcher.submit(tiny_generator, requests[k::2], "np").future.result(timeout=120)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        check_against_alone(tiny_generator, requests[0::2], results[0])
        check_against_alone(tiny_generator, requests[1::2], results[1])
    finally:
        batcher.stop()


def test_a_full_queue_and_bad_settings_are_refused(tiny_generator):
    batcher = StepBatcher(StepBatchConfig(max_queue=1))
    with pytest.raises(QueueFullError, match="queue: 0 images are waiting"):
        batcher.submit(tiny_generator, [GenerationRequest(PROMPTS[0], mode="full", seed=s) for s in range(2)])
    for kwargs, field in [({"max_rows": 1}, "max_rows"), ({"policy": "lifo"}, "policy"),
                          ({"latency_slack": -1.0}, "latency_slack"), ({"max_inflight": 0}, "max_inflight")]:
        with pytest.raises(ValueError, match=f"^{field}: "):
            StepBatchConfig(**kwargs)


def test_the_cost_model_fits_a_line_and_starts_from_a_prior():
    cost = CostModel(decay=1.0)
    assert cost.predict(4) == 5.0  # nothing seen: a = b = one unit
    cost.observe(2, 0.3)
    assert cost.predict(2) == pytest.approx(0.3) and cost.predict(5) == pytest.approx(0.6)  # a = b through the mean
    for rows, secs in [(1, 3.0), (3, 5.0), (5, 7.0)]:
        cost.observe(rows, secs)
    cost2 = CostModel(decay=1.0)
    for rows, secs in [(1, 3.0), (3, 5.0), (5, 7.0)]:
        cost2.observe(rows, secs)
    assert cost2.coefficients() == pytest.approx((2.0, 1.0))


def test_request_level_baseline_gives_the_same_images(tiny_generator):
    """``Generator.run_grouped`` (request-level batching, the serving baseline) and the step
    scheduler make the same images and records of what ran."""
    requests = mixed_requests()[:7]
    grouped = tiny_generator.run_grouped(requests, "np", batch_size=4)
    stepped = tiny_generator(requests, output_type="np", batch_size=4)
    for g, s in zip(grouped, stepped):
        assert np.abs(np.asarray(g.image) - np.asarray(s.image)).max() <= ATOL
        assert (g.record.steps, g.record.nfe, g.record.skip_mask, g.record.scheduler, g.record.guidance) == \
            (s.record.steps, s.record.nfe, s.record.skip_mask, s.record.scheduler, s.record.guidance)
