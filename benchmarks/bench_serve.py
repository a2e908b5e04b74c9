"""Benchmark stage ``bench_serve``: the Ray Serve service under load, on loopback, bounded.

One private local Ray (``address="local"``, ``num_cpus`` from params, no dashboard), the bench
profile (``serving/configs/bench.yaml``: the CPU profile with short autoscaling delays), the
embedded bundle. Every scenario is a fixed number of requests or a fixed duration, every request
has a client timeout, and the cluster is shut down at the end, so the stage stops by itself.

| scenario | what | target |
|---|---|---|
| ``throughput`` | images/s and p50/p95/p99 latency of the service in ``auto`` mode (step-level batching, the profile's) against a naive deployment of the same replica: ``full`` 50 steps, request-level ``max_batch_size`` 1 | >= 5x images/s |
| ``batching`` | ``auto`` images/s with step-level batching vs request-level ``max_batch_size`` 1 (no batching) at the same concurrency | reported |
| ``overhead`` | end-to-end images/s at saturation (HTTP, validation, PNG, base64 included) against the in-process ``Generator`` at the same batch size and threads | >= 0.85x |
| ``autoscale`` | replicas under a load step (low, high, idle): 1 -> 2 -> 1, timeline plotted | observed |
| ``overload`` | open-loop arrivals at ``factor`` x the measured capacity: every request 200 or 429/503 with Retry-After, no 5xx, nothing lost, queue bounded | 0 lost |
| ``kill`` | a replica of two killed mid-load: time until two run again, every request accounted for | reported |
| ``bad_inputs`` | >= 25 malformed or unauthorised requests -> 4xx with a clear OpenAI-shaped error each, service healthy after | all 4xx |
| ``mixed`` | mixed traffic (60 % auto, 20 % full-50, 10 % adaptive-50, 10 % student), open-loop Poisson arrivals plus a burst at 50/80/100 % of the measured capacity, the same trace served with request-level batching (``batching: request``, today's) and step-level batching (``batching: step``) on the same replica: p50/p95 per mode; short requests' (auto, student) p95 at 80 % vs alone and vs request-level; an auto request 1 s after a 4-image 50-step one; images/s at saturation; the share of adaptive requests' NFE saving that became throughput; rows per UNet call | short p95 <= 1.5x alone and <= 0.5x request-level; probe <= 2x alone; saturation >= 1.0x |

Writes reports/serve.json (everything), reports/serve_headline.json (the numbers and targets),
reports/serve.png (latency/throughput bars and the autoscaling timeline) and
reports/serve_playground.png (the playground driven by headless chromium).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from mlops.cli import command

APP = "budgetdiff"


# ----------------------------------------------------------------------------------------------
# Params
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Throughput:
    """auto (batching on) vs naive (full 50 steps, batch 1)."""

    requests: int
    naive_requests: int
    concurrency: int
    max_batch_size: int
    target_speedup: float


@dataclass(frozen=True)
class Batching:
    note: Optional[str] = None  # what the comparison is, copied into the report


@dataclass(frozen=True)
class Overhead:
    """Images/s at saturation vs the in-process Generator."""

    requests: int
    concurrency: int
    batch_size: int
    target: float


@dataclass(frozen=True)
class Autoscale:
    low_requests: int
    high_requests: int
    high_concurrency: int
    idle_timeout_s: float


@dataclass(frozen=True)
class Overload:
    factor: float
    duration_s: float


@dataclass(frozen=True)
class Kill:
    requests: int
    concurrency: int
    kill_after_s: float
    recovery_timeout_s: float


MixKind = Literal["auto", "full50", "adaptive50", "student"]  # the keys of MIX_BODIES


@dataclass(frozen=True)
class Probe:
    long_images: int
    delay_s: float
    repeats: int


@dataclass(frozen=True)
class AdaptiveShare:
    requests: int
    concurrency: int


@dataclass(frozen=True)
class Burst:
    at_s: float
    requests: int


@dataclass(frozen=True)
class MixedTargets:
    short_p95_vs_alone: float
    short_p95_vs_request: float
    probe_vs_alone: float
    saturation_vs_request: float


@dataclass(frozen=True)
class Mixed:
    """Mixed traffic: request-level vs step-level batching (``run_mixed``)."""

    mix: dict[MixKind, float]
    seed: int
    alone_requests: int
    saturation_requests: int
    saturation_concurrency: int
    probe: Probe
    adaptive_share: AdaptiveShare
    loads: list[float]
    target_load: float
    duration_s: float
    burst: Burst
    targets: MixedTargets


@dataclass(frozen=True)
class ServiceUnderTest:
    """The keys every service benchmark (bench_serve, bench_monitor) starts its private service with."""

    config: str
    model_source: str
    num_cpus: int
    torch_threads: int
    request_timeout_s: float
    prompts: int
    prompt_seed: int


@dataclass(frozen=True)
class BenchServeConfig(ServiceUnderTest):
    """The ``bench_serve`` section of params.yaml."""

    throughput: Throughput
    batching: Batching
    overhead: Overhead
    autoscale: Autoscale
    overload: Overload
    kill: Kill
    mixed: Mixed
    report_path: str
    headline_path: str
    plot_path: str
    screenshot_path: str
    http_port: Optional[int] = None


# ----------------------------------------------------------------------------------------------
# Load generation
# ----------------------------------------------------------------------------------------------
def prompts(n: int, seed: int) -> list[str]:
    from budgetdiff.domain.scenes import sample_scene, spec_to_prompt

    return [spec_to_prompt(sample_scene(seed + i), seed=seed + i) for i in range(n)]


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    a = np.asarray(values)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p95": round(float(np.percentile(a, 95)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "max": round(float(a.max()), 3)}


class Client:
    """An httpx client for the service that records every request's outcome."""

    def __init__(self, url: str, key: str, timeout_s: float):
        self.url, self.key, self.timeout_s = url, key, timeout_s

    async def one(self, client, body: dict) -> dict:
        import httpx

        start = time.perf_counter()
        out = {"t_start": time.monotonic()}
        try:
            r = await client.post("/v1/images/generations", json=body,
                                  headers={"Authorization": f"Bearer {self.key}"})
            out.update(status=r.status_code, retry_after=r.headers.get("retry-after"))
            if r.status_code == 200:
                j = r.json()
                out["images"] = len(j["data"])
                out["records"] = [{k: d["record"].get(k) for k in ("steps", "nfe", "skipped", "route",
                                                                     "batch_images", "model_version", "batch_size",
                                                                     "mean_call_images", "queue_ms", "batching")}
                                  for d in j["data"]]
            else:
                try:
                    out["error"] = r.json().get("error")
                except ValueError:
                    out["error"] = {"message": r.text[:200], "type": "not_json"}
        except httpx.TimeoutException:
            out.update(status="timeout")
        except httpx.HTTPError as exc:
            out.update(status="connection_error", error={"message": str(exc)[:200]})
        out["latency_s"] = time.perf_counter() - start
        out["t_end"] = time.monotonic()
        return out

    async def closed_loop(self, bodies: list[dict], concurrency: int) -> dict:
        """Send ``bodies`` with at most ``concurrency`` in flight; images/s over the whole run."""
        import httpx

        queue = list(bodies)
        results = []
        limits = httpx.Limits(max_connections=concurrency + 4)
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout_s, limits=limits) as client:
            async def worker():
                while queue:
                    results.append(await self.one(client, queue.pop(0)))
            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            wall = time.perf_counter() - start
        return summarise(results, wall)

    async def replay(self, trace: list[tuple[float, str]], make_body) -> dict:
        """Open loop: request i (``make_body(i, kind)``) is sent at ``trace[i][0]`` seconds after the
        start, whether or not earlier ones were answered."""
        import httpx

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout_s, limits=limits) as client:
            start = time.perf_counter()

            async def at(i: int, t: float, kind: str) -> dict:
                await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
                out = await self.one(client, make_body(i, kind))
                out.update(kind=kind, t_arrival=t)
                return out
            results = await asyncio.gather(*(at(i, t, kind) for i, (t, kind) in enumerate(trace)))
            wall = time.perf_counter() - start
        return summarise(list(results), wall)

    async def open_loop(self, make_body, rate: float, duration_s: float) -> dict:
        """Poisson-free fixed-rate arrivals for ``duration_s``: the load does not wait for answers."""
        import httpx

        tasks, i = [], 0
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout_s, limits=limits) as client:
            start = time.perf_counter()
            while time.perf_counter() - start < duration_s:
                tasks.append(asyncio.create_task(self.one(client, make_body(i))))
                i += 1
                await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            results = await asyncio.gather(*tasks)
            wall = time.perf_counter() - start
        return summarise(list(results), wall)


def summarise(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["status"] == 200]
    images = sum(r.get("images", 0) for r in ok)
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    steps = [rec["steps"] for r in ok for rec in r["records"]]
    nfe = [rec["nfe"] for r in ok for rec in r["records"]]
    batch = [rec["batch_images"] for r in ok for rec in r["records"] if rec.get("batch_images")]
    return {"requests": len(results), "ok": len(ok), "images": images, "wall_s": round(wall, 3),
            "images_per_s": round(images / wall, 4) if wall > 0 else None, "statuses": statuses,
            "latency_s": _percentiles([r["latency_s"] for r in ok]),
            "mean_steps": round(float(np.mean(steps)), 2) if steps else None,
            "mean_nfe": round(float(np.mean(nfe)), 2) if nfe else None,
            "mean_batch_images": round(float(np.mean(batch)), 2) if batch else None,
            "_results": results}


def _strip(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------------------------
# The cluster
# ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_config(base: dict, *, replicas: int | None = None, autoscale: bool = False, **user_config) -> dict:
    """The bench profile with fixed replicas (or its autoscaling) and user_config overrides."""
    from serving.config import MODEL, deployment, with_overrides

    dep = dict(deployment(json.loads(json.dumps(base)), MODEL))
    extra = {"autoscaling_config": dep.get("autoscaling_config") if autoscale else None,
             "num_replicas": None if autoscale else (replicas or 1)}
    return with_overrides(base, model=user_config, deployments={MODEL: extra})


def replica_counts() -> dict:
    """ImageModel's replicas by state, from the Serve controller."""
    from ray import serve

    status = serve.status().applications.get(APP)
    if status is None:
        return {}
    dep = status.deployments.get("ImageModel")
    return {str(k.value if hasattr(k, "value") else k): v for k, v in (dep.replica_states or {}).items()} if dep else {}


def running_replicas() -> int:
    return int(replica_counts().get("RUNNING", 0))


def wait_replicas(n: int, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if running_replicas() == n and sum(replica_counts().values()) == n:
            return time.monotonic() - start
        time.sleep(0.5)
    raise RuntimeError(f"replicas: {n} did not run within {timeout_s:.0f}s ({replica_counts()})")


@contextmanager
def replica_sampler(period_s: float = 0.5):
    """Sample the replica count in a thread; yields the list of (monotonic time, counts)."""
    samples: list[tuple[float, dict]] = []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                samples.append((time.monotonic(), replica_counts()))
            except Exception:
                pass
            stop.wait(period_s)
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(5)


def replica_cpu_s(url: str) -> float:
    """CPU seconds the (single) ImageModel replica's process has used so far (from /healthz)."""
    import httpx

    return float(httpx.get(f"{url}/healthz", timeout=60).json()["cpu_s"])


def served_batching(url: str, key: str) -> tuple:
    """(batching, max_batch_size, max_rows) as a model replica reports them (/v1/models asks one)."""
    import httpx

    r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=60)
    r.raise_for_status()
    card = r.json()["data"][0]
    return card.get("batching"), card.get("max_batch_size"), card.get("max_rows")


def step_stats(url: str) -> dict | None:
    """The (single) replica's step-scheduler counters (/healthz), None under request batching."""
    import httpx

    return httpx.get(f"{url}/healthz", timeout=60).json().get("batcher")


def measured(client: "Client", url: str, bodies: list[dict], concurrency: int) -> dict:
    """A closed-loop run plus the replica's CPU seconds per image: other tenants of the machine
    slow the wall clock, not the CPU time a replica spends on an image."""
    before = replica_cpu_s(url)
    out = asyncio.run(client.closed_loop(bodies, concurrency))
    cpu = replica_cpu_s(url) - before
    out["replica_cpu_s_per_image"] = round(cpu / max(1, out["images"]), 4)
    return out


def kill_one_replica(url: str, key: str) -> str:
    """Kill one ImageModel replica actor (found by its Serve actor name in the GCS; no HTTP call,
    which could queue behind the load)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#ImageModel#"
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == "serve" and a["name"].startswith(prefix))
    if not names:
        raise RuntimeError("kill: no ImageModel replica actor found")
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0][len(prefix):]


# ----------------------------------------------------------------------------------------------
# Scenarios
# ----------------------------------------------------------------------------------------------
def bad_input_cases(key: str) -> list[dict]:
    """(name, headers, raw body) cases that must each get a 4xx with a clear error."""
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def j(body):
        return json.dumps(body).encode()
    cases = [
        ("empty prompt", auth, j({"prompt": ""})),
        ("blank prompt", auth, j({"prompt": "   \n"})),
        ("missing prompt", auth, j({"n": 1})),
        ("huge prompt", auth, j({"prompt": "red circle " * 200})),
        ("non-UTF-8 prompt", auth, b'{"prompt": "a \xff\xfe red circle"}'),
        ("prompt is a number", auth, j({"prompt": 7})),
        ("n = 0", auth, j({"prompt": "a red circle", "n": 0})),
        ("n = 11", auth, j({"prompt": "a red circle", "n": 11})),
        ("n is a string", auth, j({"prompt": "a red circle", "n": "3"})),
        ("unknown size", auth, j({"prompt": "a red circle", "size": "1024x1024"})),
        ("malformed size", auth, j({"prompt": "a red circle", "size": "large"})),
        ("unknown mode", auth, j({"prompt": "a red circle", "mode": "turbo"})),
        ("unknown scheduler", auth, j({"prompt": "a red circle", "mode": "full", "scheduler": "pndm"})),
        ("negative steps", auth, j({"prompt": "a red circle", "mode": "full", "steps": -5})),
        ("steps with auto", auth, j({"prompt": "a red circle", "steps": 20})),
        ("NaN guidance", auth, b'{"prompt": "a red circle", "guidance_scale": NaN}'),
        ("negative guidance", auth, j({"prompt": "a red circle", "guidance_scale": -2})),
        ("quality_target > 1", auth, j({"prompt": "a red circle", "quality_target": 2})),
        ("quality_target is a string", auth, j({"prompt": "a red circle", "quality_target": "high"})),
        ("negative seed", auth, j({"prompt": "a red circle", "seed": -1})),
        ("url response_format", auth, j({"prompt": "a red circle", "response_format": "url"})),
        ("unknown field", auth, j({"prompt": "a red circle", "negative_prompt": "blue"})),
        ("streaming", auth, j({"prompt": "a red circle", "stream": True})),
        ("unknown model", auth, j({"prompt": "a red circle", "model": "dall-e-3"})),
        ("malformed JSON", auth, b'{"prompt": "a red circle"'),
        ("JSON array", auth, b'["a red circle"]'),
        ("empty body", auth, b""),
        ("oversized body", auth, j({"prompt": "x" * 200_000})),
        ("missing key", {"Content-Type": "application/json"}, j({"prompt": "a red circle"})),
        ("wrong key", {"Authorization": "Bearer not-the-key", "Content-Type": "application/json"},
         j({"prompt": "a red circle"})),
        ("basic auth", {"Authorization": "Basic dXNlcjpwYXNz", "Content-Type": "application/json"},
         j({"prompt": "a red circle"})),
    ]
    return [{"name": n, "headers": h, "body": b} for n, h, b in cases]


def run_bad_inputs(url: str, key: str, timeout_s: float) -> dict:
    import httpx

    rows = []
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        for case in bad_input_cases(key):
            r = client.post("/v1/images/generations", content=case["body"], headers=case["headers"])
            try:
                err = r.json().get("error") or {}
            except ValueError:
                err = {}
            clear = bool(err.get("message")) and set(err) >= {"message", "type", "param", "code"}
            rows.append({"case": case["name"], "status": r.status_code, "param": err.get("param"),
                         "message": err.get("message"), "ok": 400 <= r.status_code < 500 and clear})
        health = client.get("/healthz")
        good = client.post("/v1/images/generations", json={"prompt": "a red circle", "seed": 1},
                           headers={"Authorization": f"Bearer {key}"})
    return {"cases": rows, "n": len(rows), "all_4xx_clear": all(r["ok"] for r in rows),
            "healthy_after": health.status_code == 200 and good.status_code == 200}


def in_process_baseline(bundle: str, bodies: list[dict], batch_size: int, threads: int) -> dict:
    """The same requests through ``Generator`` in this process (PIL images, no HTTP, no PNG)."""
    import torch

    from budgetdiff.generation.engine import GenerationRequest, Generator

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = Generator.load(bundle, device="cpu")
        gen([GenerationRequest("a red circle", mode="full", steps=2)])  # warm-up, as replicas do
        requests = [GenerationRequest(b["prompt"], mode=b.get("mode", "auto"), seed=b["seed"]) for b in bodies]
        start, cpu = time.perf_counter(), time.process_time()
        gen(requests, batch_size=batch_size)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        torch.set_num_threads(before)
    return {"images": len(requests), "wall_s": round(wall, 3), "images_per_s": round(len(requests) / wall, 4),
            "cpu_s_per_image": round(cpu / len(requests), 4), "batch_size": batch_size, "threads": threads}


def screenshot_playground(url: str, key: str, path: str, timeout_s: float = 120) -> dict:
    """Drive the playground in headless chromium: generate one image, save a screenshot."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,820"):
        options.add_argument(arg)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService("/usr/bin/chromedriver"))
    try:
        driver.get(url + "/")
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a large red circle at the top left and a small blue square at the bottom right")
        Select(driver.find_element(By.ID, "mode")).select_by_value("auto")
        driver.find_element(By.ID, "seed").clear()
        driver.find_element(By.ID, "seed").send_keys("7")
        driver.find_element(By.ID, "use-quality").click()  # send quality_target 0.90
        driver.find_element(By.ID, "api-key").send_keys(key)
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, timeout_s).until(
            lambda d: d.find_element(By.ID, "stat-steps").text not in ("", "-")
            or d.find_element(By.ID, "error").is_displayed())
        stats = {k: driver.find_element(By.ID, f"stat-{k}").text for k in ("mode", "steps", "nfe", "skipped", "latency")}
        error = driver.find_element(By.ID, "error").text
        driver.save_screenshot(path)
    finally:
        driver.quit()
    return {"stats": stats, "error": error, "path": path}


# ----------------------------------------------------------------------------------------------
# Mixed traffic: request-level vs step-level batching (issue 31)
# ----------------------------------------------------------------------------------------------
MIX_BODIES = {"auto": {}, "full50": {"mode": "full", "steps": 50}, "adaptive50": {"mode": "adaptive", "steps": 50},
              "student": {"mode": "student"}}
SHORT_KINDS = ("auto", "student")


def mixed_trace(mix: dict, rate: float, duration_s: float, burst: Burst, seed: int) -> list[tuple[float, str]]:
    """Open-loop arrivals: a Poisson process of ``rate`` requests/s over ``duration_s`` plus
    ``burst.requests`` arriving together at ``burst.at_s``; each request's kind drawn from
    ``mix`` ({kind: share}). The same arguments give the same trace."""
    rng = np.random.default_rng(seed)
    times, t = [], float(rng.exponential(1.0 / rate))
    while t < duration_s:
        times.append(t)
        t += float(rng.exponential(1.0 / rate))
    times = sorted(times + [burst.at_s] * burst.requests)
    kinds, shares = list(mix), np.asarray(list(mix.values()), dtype=float)
    drawn = rng.choice(len(kinds), size=len(times), p=shares / shares.sum())
    return [(round(t, 4), kinds[k]) for t, k in zip(times, drawn)]


def by_kind(results: list[dict]) -> dict:
    """Latency percentiles (s) of the answered requests per kind, and the non-200 count."""
    out = {}
    for kind in sorted({r["kind"] for r in results}):
        rs = [r for r in results if r["kind"] == kind]
        ok = [r["latency_s"] for r in rs if r["status"] == 200]
        out[kind] = {"requests": len(rs), "ok": len(ok), **_percentiles(ok)}
    return out


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def run_mixed(mx: Mixed, base: dict, client: "Client", deploy, bodies, threads: int, url: str, progress) -> dict:
    """The mixed-traffic scenario (module docstring): one replica, the bench profile's step
    settings against ``batching: request`` at the same ``max_batch_size``; every phase runs the
    same requests (prompts, seeds, arrival times) on both."""
    mix = dict(mx.mix)  # kinds of MIX_BODIES only (MixKind)
    seed = mx.seed
    all_bodies = bodies(4096, 60_000)

    def body(i: int, kind: str, **extra) -> dict:
        return {**all_bodies[i % len(all_bodies)], **MIX_BODIES[kind], **extra}

    modes = {m: model_config(base, replicas=1, torch_threads=threads, batching=m) for m in ("request", "step")}
    out: dict = {"mix": mix, "modes": {m: user_config_record(c) for m, c in modes.items()}, "deploy_s": {}}
    alone: dict = {}
    saturation: dict = {}
    probe: dict = {}
    share: dict = {}
    loads: dict = {}
    capacity = None
    together: dict = {}
    measured_first = ("alone", "saturation", "probe", "adaptive_share")
    # three deployments in all (a batching switch reconfigures the replica in place)
    schedule = [("request", measured_first), ("step", measured_first + ("together", "loads")), ("request", ("loads",))]
    for mode, phases in schedule:
        out["deploy_s"][f"{mode}_{phases[-1]}"] = deploy(modes[mode], f"mixed: batching {mode}")
        for phase in phases:
            if phase in ("loads", "together") and capacity is None:  # what both batchings sustain
                capacity = min(saturation[m]["images_per_s"] for m in saturation)
            before = step_stats(url) if mode == "step" else None
            if phase == "alone":  # one request at a time: nothing to share calls with or wait behind
                progress(f"[bench_serve] mixed: alone latency, batching {mode}")
                res = {}
                for kind in SHORT_KINDS:
                    reqs = [body(i, kind) for i in range(mx.alone_requests)]
                    res[kind] = _strip(asyncio.run(client.closed_loop(reqs, 1)))
                alone[mode] = {k: v["latency_s"]["p50"] for k, v in res.items()}
            elif phase == "saturation":  # closed loop at a fixed concurrency: what the replica can do
                progress(f"[bench_serve] mixed: saturation, batching {mode}")
                rng = np.random.default_rng(seed + 1)
                kinds = list(mix)
                p = np.asarray([mix[k] for k in kinds]) / sum(mix.values())
                reqs = [body(i, kinds[k]) for i, k in enumerate(rng.choice(len(kinds), mx.saturation_requests, p=p))]
                saturation[mode] = _strip(asyncio.run(client.closed_loop(reqs, mx.saturation_concurrency)))
            elif phase == "probe":  # an auto request arriving while a 4-image 50-step one runs
                progress(f"[bench_serve] mixed: probe, batching {mode}")
                pr = mx.probe
                latencies = []
                for r in range(pr.repeats):
                    async def one_probe(r=r):
                        trace = [(0.0, "full50"), (pr.delay_s, "auto")]

                        def make(i, kind):
                            return body(100 + 2 * r + i, kind, **({"n": pr.long_images} if i == 0 else {}))
                        return await client.replay(trace, make)
                    res = asyncio.run(one_probe())["_results"]
                    short = [x for x in res if x["kind"] == "auto"][0]
                    latencies.append(round(short["latency_s"], 3) if short["status"] == 200 else None)
                ok = [x for x in latencies if x is not None]
                probe[mode] = {"auto_latency_s": latencies, "median_s": round(float(np.median(ok)), 3) if ok else None}
            elif phase == "together":  # the target-load trace's burst of short requests, alone on the replica
                trace = mixed_trace(mix, mx.target_load * capacity, mx.duration_s, mx.burst,
                                    seed + int(round(mx.target_load * 100)))
                group = [(0.0, kind) for t, kind in trace if t == mx.burst.at_s and kind in SHORT_KINDS]
                progress(f"[bench_serve] mixed: the burst's {len(group)} short requests together, batching {mode}")
                runs = []
                for r in range(mx.probe.repeats if len(group) > 1 else 0):
                    res = asyncio.run(client.replay(group, lambda i, kind, r=r: body(300 + 10 * r + i, kind)))
                    runs.append([{"kind": x["kind"], "latency_s": round(x["latency_s"], 3) if x["status"] == 200
                                  else None} for x in res["_results"]])
                together[mode] = {"requests": [k for _, k in group], "runs": runs}
            elif phase == "adaptive_share":  # full-50 only, then adaptive-50 only, closed loop
                progress(f"[bench_serve] mixed: adaptive vs full throughput, batching {mode}")
                a = mx.adaptive_share
                runs = {}
                for kind in ("full50", "adaptive50"):
                    reqs = [body(200 + i, kind) for i in range(a.requests)]
                    runs[kind] = _strip(asyncio.run(client.closed_loop(reqs, a.concurrency)))
                f, ad = runs["full50"], runs["adaptive50"]
                ideal = _ratio(f["mean_nfe"], ad["mean_nfe"])
                realised = _ratio(ad["images_per_s"], f["images_per_s"])
                share[mode] = {"full50": f, "adaptive50": ad, "nfe_ratio": ideal, "throughput_ratio": realised,
                               "share": round((realised - 1) / (ideal - 1), 3) if ideal and realised and ideal > 1.001
                               else None}
            else:  # open-loop mixed traffic at each load level, the same trace for both modes
                for load in mx.loads:
                    rate = load * capacity
                    trace = mixed_trace(mix, rate, mx.duration_s, mx.burst, seed + int(round(load * 100)))
                    progress(f"[bench_serve] mixed: {len(trace)} requests at {load:.0%} of {capacity:.3f} images/s, "
                             f"batching {mode}")
                    res = asyncio.run(client.replay(trace, body))
                    loads.setdefault(str(load), {})[mode] = {
                        **{k: v for k, v in _strip(res).items() if k != "latency_s"}, "rate_rps": round(rate, 4),
                        "latency_s": res["latency_s"], "by_kind": by_kind(res["_results"])}
            if mode == "step":
                after = step_stats(url)
                if before is not None and after is not None:
                    calls = after["unet_calls"] - before["unet_calls"]
                    rows = (after["rows_per_call"] or 0) * after["unet_calls"] - \
                        (before["rows_per_call"] or 0) * before["unet_calls"]
                    out.setdefault("rows_per_unet_call", {})[phase] = round(rows / calls, 3) if calls else None
    out.update(alone_latency_s=alone, saturation=saturation, probe=probe, adaptive_share=share, loads=loads,
               capacity_images_per_s=capacity, together=together)
    out["summary"] = mixed_summary(out, mx)
    return out


def user_config_record(config: dict) -> dict:
    from serving.config import MODEL, user_config

    return user_config(config, MODEL).batching_record()


def short_p95_floor(mx: Mixed, capacity: float, alone: dict, together: dict) -> dict:
    """How low the short requests' p95 at the target load can go on this replica, whatever the
    scheduler does with the long requests: every short request of the target-load trace takes its
    latency alone, except those of the burst, which arrive together and must share the device.
    Two ways to serve the burst: batched (measured: the burst's short requests sent together to
    an idle replica, ``together``; median over the repeats per position) and one after another
    (modelled: the i-th finishes after i + 1 alone latencies). The floor is the lower of the two
    p95s, as a ratio to the latency alone. On a device whose cost grows with the rows of a call
    (a CPU), two short requests at once take about twice as long: no scheduler beats that."""
    trace = mixed_trace(dict(mx.mix), mx.target_load * capacity, mx.duration_s, mx.burst,
                        mx.seed + int(round(mx.target_load * 100)))
    burst = [k for t, k in trace if t == mx.burst.at_s and k in SHORT_KINDS]
    runs = together.get("runs") or []
    out = {"burst_short_requests": burst}
    for kind in SHORT_KINDS:
        base = alone.get(kind)
        n_kind = sum(1 for _, k in trace if k == kind)
        positions = [i for i, k in enumerate(burst) if k == kind]
        if not base or not n_kind:
            continue
        others = [base] * (n_kind - len(positions))
        measured = None
        if positions and runs:
            per_position = [np.median([run[i]["latency_s"] for run in runs if run[i]["latency_s"] is not None])
                            for i in positions]
            measured = _percentiles(others + [float(x) for x in per_position])["p95"]
        elif not positions:
            measured = _percentiles(others)["p95"]
        serial = _percentiles(others + [base * (i + 1) for i in range(len(positions))])["p95"]
        floors = [x for x in (measured, serial) if x is not None]
        out[kind] = {"requests_at_target_load": n_kind, "in_burst": len(positions),
                     "p95_batched_s": measured, "p95_serial_model_s": serial,
                     "floor_p95_vs_alone": _ratio(min(floors), base) if floors else None}
    return out


def mixed_summary(out: dict, mx: Mixed) -> dict:
    """The targets of issue 31 from a finished mixed run."""
    t = mx.targets
    at80 = out["loads"].get(str(mx.target_load), {})
    alone, sat, probe = out["alone_latency_s"], out["saturation"], out["probe"]
    short = {}
    for kind in SHORT_KINDS:
        step_p95 = at80.get("step", {}).get("by_kind", {}).get(kind, {}).get("p95")
        req_p95 = at80.get("request", {}).get("by_kind", {}).get(kind, {}).get("p95")
        short[kind] = {"step_p95_s": step_p95, "request_p95_s": req_p95,
                       "alone_step_s": alone.get("step", {}).get(kind), "alone_request_s": alone.get("request", {}).get(kind),
                       "step_p95_vs_alone": _ratio(step_p95, alone.get("step", {}).get(kind)),
                       "step_p95_vs_request_alone": _ratio(step_p95, alone.get("request", {}).get(kind)),
                       "step_vs_request_p95": _ratio(step_p95, req_p95),
                       "request_p95_vs_alone": _ratio(req_p95, alone.get("request", {}).get(kind))}
    vs_alone = [v["step_p95_vs_alone"] for v in short.values()]
    vs_req = [v["step_vs_request_p95"] for v in short.values()]
    probe_step = _ratio(probe.get("step", {}).get("median_s"), alone.get("step", {}).get("auto"))
    probe_req = _ratio(probe.get("request", {}).get("median_s"), alone.get("request", {}).get("auto"))
    sat_ratio = _ratio(sat["step"]["images_per_s"], sat["request"]["images_per_s"]) if sat else None
    return {
        "short": short,
        "short_p95_vs_alone_max": max(vs_alone) if None not in vs_alone else None,
        "short_p95_vs_alone_met": None not in vs_alone and max(vs_alone) <= t.short_p95_vs_alone,
        "short_p95_vs_request_max": max(vs_req) if None not in vs_req else None,
        "short_p95_vs_request_met": None not in vs_req and max(vs_req) <= t.short_p95_vs_request,
        "probe_step_vs_alone": probe_step, "probe_request_vs_alone": probe_req,
        "probe_met": probe_step is not None and probe_step <= t.probe_vs_alone,
        "saturation_step_vs_request": sat_ratio,
        "saturation_met": sat_ratio is not None and sat_ratio >= t.saturation_vs_request,
        "adaptive_share_step": out["adaptive_share"].get("step", {}).get("share"),
        "adaptive_share_request": out["adaptive_share"].get("request", {}).get("share"),
        "rows_per_unet_call": out.get("rows_per_unet_call"),
        "short_p95_floor": (short_p95_floor(mx, out["capacity_images_per_s"], alone.get("step", {}),
                                            out.get("together", {}).get("step", {}))
                            if out.get("capacity_images_per_s") else None),
    }



# ----------------------------------------------------------------------------------------------
def run(cfg: BenchServeConfig, progress=print, only: str | None = None) -> dict:
    """Every scenario (``only`` None), or only the ``standard`` ones or only ``mixed``."""
    import ray
    from ray import serve

    from serving.config import MODEL, load_serve_config, user_config, with_overrides
    from serving.deploy import run_in_process

    standard, mixed = only in (None, "standard"), only in (None, "mixed")
    t0 = time.perf_counter()
    key = secrets.token_hex(16)
    os.environ["BENCH_SERVE_API_KEY"] = key  # the local raylet, hence the replicas, inherit it
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from mlops.params import config_dict

    base = with_overrides(load_serve_config(cfg.config), http_port=cfg.http_port or _free_port(),
                          model_source=cfg.model_source, ingress={"api_key_env": "BENCH_SERVE_API_KEY"})
    threads = cfg.torch_threads
    timeout_s = cfg.request_timeout_s
    report: dict = {"config": config_dict(cfg), "cpus": os.cpu_count(), "load_average_start": os.getloadavg()}
    all_prompts = prompts(cfg.prompts, cfg.prompt_seed)

    def bodies(n: int, seed0: int = 0, **extra) -> list[dict]:
        return [{"prompt": all_prompts[(seed0 + i) % len(all_prompts)], "seed": seed0 + i, **extra}
                for i in range(n)]

    os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")  # a busy 2-core machine starts slowly
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")  # ...and so does the HTTP proxy
    ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        def deploy(config, what):
            """Deploy and wait until it is applied (deploy_apps returns before a user_config
            change reaches the replicas; an earlier version of this bench measured the overhead
            phase with the previous phase's max_batch_size 1), then check what the replicas say."""
            progress(f"[bench_serve] deploy: {what}")
            start = time.perf_counter()
            run_in_process(config, wait_s=600)  # returns once a user_config change reaches the replicas
            options = user_config(config, MODEL)
            want = (options.batching, options.max_batch_size,
                    options.step_max_rows if options.batching == "step" else None)
            served = served_batching(url, key)
            if served != want:
                raise RuntimeError(f"bench_serve: deployed (batching, max_batch_size, max_rows) {want}, "
                                   f"replicas report {served}")
            return round(time.perf_counter() - start, 2)

        from serving.deploy import base_url

        url = base_url(base)
        client = Client(url, key, timeout_s)
        tp = cfg.throughput
        report["deploy_s"] = {}
        if standard:
            # 1. auto mode, batching on, one replica
            one = model_config(base, replicas=1, torch_threads=threads, max_batch_size=tp.max_batch_size)
            report["deploy_s"]["auto_batch"] = deploy(one, "auto, the profile's step-level batching")
            asyncio.run(client.closed_loop(bodies(4, 10_000), 4))  # warm the path end to end
            progress("[bench_serve] throughput: auto")
            auto = measured(client, url, bodies(tp.requests), tp.concurrency)
            # 2. overload at factor x the capacity just measured (same deployment)
            ov = cfg.overload
            rate = float(auto["images_per_s"]) * ov.factor
            progress(f"[bench_serve] overload: {rate:.2f} req/s for {ov.duration_s}s")
            over = asyncio.run(client.open_loop(lambda i: bodies(1, 20_000 + i)[0], rate, ov.duration_s))
            over_results = over["_results"]
            bad_status = [r for r in over_results if r["status"] not in (200, 429, 503)]
            no_retry = [r for r in over_results if r["status"] in (429, 503) and not r.get("retry_after")]
            model_dep = [d for d in base["applications"][0]["deployments"] if d["name"] == "ImageModel"][0]
            report["overload"] = {
                **_strip(over), "offered_rate_rps": round(rate, 3), "capacity_images_per_s": auto["images_per_s"],
                "lost": len(bad_status), "rejected_without_retry_after": len(no_retry),
                "queue_bound": int(model_dep["max_queued_requests"]) + int(model_dep["max_ongoing_requests"]),
                "max_ok_latency_s": over["latency_s"]["max"],
                "met": not bad_status and not no_retry and over["ok"] > 0}
            # 3. bad inputs, health after, and the playground
            progress("[bench_serve] bad inputs")
            report["bad_inputs"] = run_bad_inputs(url, key, timeout_s)
            try:
                progress("[bench_serve] playground screenshot")
                report["playground"] = screenshot_playground(url, key, cfg.screenshot_path)
            except Exception as exc:  # chromium missing: say so, keep the numbers
                report["playground"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            # 4. batching off (same replica: a user_config change reconfigures in place)
            bt = cfg.batching
            report["deploy_s"]["auto_nobatch"] = deploy(
                model_config(base, replicas=1, torch_threads=threads, batching="request", max_batch_size=1),
                "auto, request-level max_batch_size 1")
            progress("[bench_serve] batching: request-level max_batch_size 1 (no batching)")
            auto_nobatch = measured(client, url, bodies(tp.requests), tp.concurrency)
            # 5. the naive deployment: full 50 steps, no batching, same replica
            progress("[bench_serve] throughput: naive (full 50 steps, request-level max_batch_size 1)")
            naive = measured(client, url, bodies(tp.naive_requests, 0, mode="full", steps=50), tp.concurrency)
            # 6. overhead: saturation vs the in-process Generator at the same batch size and threads
            oh = cfg.overhead
            report["deploy_s"]["overhead"] = deploy(
                model_config(base, replicas=1, torch_threads=threads, max_batch_size=oh.batch_size,
                             # the in-process Generator's step scheduler: FIFO, 2 x batch_size rows
                             step_max_rows=2 * oh.batch_size, step_max_inflight=2 * oh.batch_size,
                             step_policy="fifo", step_latency_slack=None),
                "overhead")
            progress("[bench_serve] overhead: service at saturation")
            service = measured(client, url, bodies(oh.requests, 30_000), oh.concurrency)
            progress("[bench_serve] overhead: in-process Generator")
            local = in_process_baseline(base_bundle(base), bodies(oh.requests, 30_000), oh.batch_size, threads)
            ratio = service["images_per_s"] / local["images_per_s"]
            report["overhead"] = {"service": _strip(service), "in_process": local, "ratio": round(ratio, 3),
                                  "ratio_cpu_time": round(local["cpu_s_per_image"] / service["replica_cpu_s_per_image"], 3),
                                  "target": oh.target, "met": ratio >= oh.target}
            speedup = auto["images_per_s"] / naive["images_per_s"]
            cpu_speedup = naive["replica_cpu_s_per_image"] / auto["replica_cpu_s_per_image"]
            report["throughput"] = {"auto": _strip(auto), "naive": _strip(naive), "speedup": round(speedup, 2),
                                    "speedup_replica_cpu_time": round(cpu_speedup, 2),
                                    "target": tp.target_speedup, "met": speedup >= tp.target_speedup}
            report["batching"] = {"step": _strip(auto), "request_max_batch_size_1": _strip(auto_nobatch),
                                  "gain": round(auto["images_per_s"] / auto_nobatch["images_per_s"], 3),
                                  "concurrency": tp.concurrency, "note": bt.note}
        if mixed:
            report["mixed"] = run_mixed(cfg.mixed, base, client, deploy, bodies, threads, url, progress)
        if standard:
            # 7. autoscaling under a load step
            au = cfg.autoscale
            report["deploy_s"]["autoscale"] = deploy(model_config(base, autoscale=True, torch_threads=threads),
                                                     "autoscaling 1..2")
            wait_replicas(1, 120)
            progress("[bench_serve] autoscale: load step")
            with replica_sampler() as samples:
                t_start = time.monotonic()

                async def step():
                    low = await client.closed_loop(bodies(au.low_requests, 40_000), 1)
                    t_high = time.monotonic()
                    high = asyncio.create_task(client.closed_loop(bodies(au.high_requests, 41_000),
                                                                  au.high_concurrency))
                    return low, t_high, await high
                low, t_high, high = asyncio.run(step())
                t_idle = time.monotonic()
                try:
                    down_s = wait_replicas(1, au.idle_timeout_s)
                except RuntimeError:
                    down_s = None
            timeline = [{"t": round(t - t_start, 2), **c} for t, c in samples]
            peak = max((c.get("RUNNING", 0) for _, c in samples), default=0)
            first_two = next((s["t"] for s in timeline if s.get("RUNNING", 0) >= 2), None)
            report["autoscale"] = {"low": _strip(low), "high": _strip(high), "timeline": timeline,
                                   "t_high_start": round(t_high - t_start, 2), "t_idle_start": round(t_idle - t_start, 2),
                                   "peak_replicas": peak, "t_two_replicas": first_two,
                                   "scale_down_s_after_idle": round(down_s, 2) if down_s is not None else None,
                                   "met": peak >= 2 and down_s is not None}
            # 8. a replica killed mid-load (two fixed replicas)
            kl = cfg.kill
            report["deploy_s"]["kill"] = deploy(model_config(base, replicas=2, torch_threads=threads), "2 replicas")
            wait_replicas(2, 180)
            progress("[bench_serve] kill: one replica of two mid-load")

            async def killed():
                load = asyncio.create_task(client.closed_loop(bodies(kl.requests, 50_000), kl.concurrency))
                await asyncio.sleep(kl.kill_after_s)
                t_kill = time.monotonic()
                replica = await asyncio.to_thread(kill_one_replica, url, key)
                return t_kill, replica, await load
            with replica_sampler(0.25) as kill_samples:
                t_kill, replica, load = asyncio.run(killed())
                deadline = time.monotonic() + kl.recovery_timeout_s
                while time.monotonic() < deadline:  # until the controller noticed and two run again
                    noticed = any(t > t_kill and c.get("RUNNING", 0) < 2 for t, c in kill_samples)
                    if noticed and kill_samples and kill_samples[-1][1].get("RUNNING", 0) == 2 \
                            and sum(kill_samples[-1][1].values()) == 2:
                        break
                    time.sleep(0.5)
            after = [(t, c) for t, c in kill_samples if t > t_kill]
            t_noticed = next((t for t, c in after if c.get("RUNNING", 0) < 2), None)
            t_back = next((t for t, c in after if t_noticed and t > t_noticed and c.get("RUNNING", 0) == 2
                           and sum(c.values()) == 2), None)
            results = load["_results"]
            first_ok = min((r["t_end"] for r in results if r["status"] == 200 and r["t_start"] > t_kill), default=None)
            unaccounted = [r for r in results if r["status"] not in (200, 503, 429)]
            report["kill"] = {**_strip(load), "killed_replica": replica,
                              "noticed_s": round(t_noticed - t_kill, 2) if t_noticed else None,
                              "recovery_s": round(t_back - t_kill, 2) if t_back else None,
                              "first_ok_after_kill_s": round(first_ok - t_kill, 2) if first_ok else None,
                              "timeline": [{"t": round(t - t_kill, 2), **c} for t, c in kill_samples],
                              "failed": sum(1 for r in results if r["status"] != 200),
                              "errors": [(r.get("error") or {}).get("code") for r in results if r["status"] != 200],
                              "unaccounted": len(unaccounted), "met": not unaccounted and t_back is not None}
    finally:
        serve.shutdown()
        ray.shutdown()
    report["seconds_total"] = round(time.perf_counter() - t0, 1)
    report["load_average_end"] = os.getloadavg()
    return report


def base_bundle(config: dict) -> str:
    from serving.config import MODEL, ModelOptions, deployment

    return ModelOptions.from_dict(deployment(json.loads(json.dumps(config)), MODEL).get("user_config")).resolved().model_source


def headline(report: dict) -> dict:
    out = standard_headline(report) if "throughput" in report else {}
    if "mixed" in report:
        out.update(mixed_headline(report["mixed"]))
    out["seconds_total"] = report["seconds_total"]
    return out


def mixed_headline(m: dict) -> dict:
    """The mixed scenario's numbers and targets (prefixed ``mixed_``)."""
    s = m["summary"]
    at = {load: {mode: v for mode, v in by_mode.items()} for load, by_mode in m["loads"].items()}
    out = {"mixed_capacity_images_per_s": m["capacity_images_per_s"]}
    for load, by_mode in at.items():
        pct = int(round(float(load) * 100))
        for mode, r in by_mode.items():
            for kind, q in r["by_kind"].items():
                out[f"mixed_{pct}_{mode}_{kind}_p50_s"] = q["p50"]
                out[f"mixed_{pct}_{mode}_{kind}_p95_s"] = q["p95"]
    for kind, v in s["short"].items():
        out[f"mixed_alone_step_{kind}_s"] = v["alone_step_s"]
        out[f"mixed_alone_request_{kind}_s"] = v["alone_request_s"]
        out[f"mixed_short_{kind}_p95_vs_alone"] = v["step_p95_vs_alone"]
        out[f"mixed_short_{kind}_p95_vs_request"] = v["step_vs_request_p95"]
    out.update({
        "mixed_short_p95_vs_alone_met": s["short_p95_vs_alone_met"],
        "mixed_short_p95_vs_request_met": s["short_p95_vs_request_met"],
        "mixed_probe_step_vs_alone": s["probe_step_vs_alone"], "mixed_probe_request_vs_alone": s["probe_request_vs_alone"],
        "mixed_probe_met": s["probe_met"],
        "mixed_saturation_step_images_per_s": m["saturation"]["step"]["images_per_s"],
        "mixed_saturation_request_images_per_s": m["saturation"]["request"]["images_per_s"],
        "mixed_saturation_step_vs_request": s["saturation_step_vs_request"], "mixed_saturation_met": s["saturation_met"],
        "mixed_adaptive_saving_share_step": s["adaptive_share_step"],
        "mixed_adaptive_saving_share_request": s["adaptive_share_request"],
        "mixed_rows_per_unet_call": s["rows_per_unet_call"],
    })
    floor = s.get("short_p95_floor") or {}
    for kind in SHORT_KINDS:
        if kind in floor:
            out[f"mixed_short_{kind}_p95_floor_vs_alone"] = floor[kind]["floor_p95_vs_alone"]
    return out


def standard_headline(report: dict) -> dict:
    t, o, a = report["throughput"], report["overhead"], report["autoscale"]
    return {
        "auto_images_per_s": t["auto"]["images_per_s"], "naive_images_per_s": t["naive"]["images_per_s"],
        "speedup_vs_naive": t["speedup"], "speedup_met": t["met"],
        "speedup_vs_naive_replica_cpu_time": t["speedup_replica_cpu_time"],
        "auto_replica_cpu_s_per_image": t["auto"]["replica_cpu_s_per_image"],
        "naive_replica_cpu_s_per_image": t["naive"]["replica_cpu_s_per_image"],
        "auto_latency_p50_s": t["auto"]["latency_s"]["p50"], "auto_latency_p95_s": t["auto"]["latency_s"]["p95"],
        "auto_latency_p99_s": t["auto"]["latency_s"]["p99"],
        "naive_latency_p50_s": t["naive"]["latency_s"]["p50"], "naive_latency_p99_s": t["naive"]["latency_s"]["p99"],
        "batching_gain_step_vs_unbatched": report["batching"]["gain"],
        "overhead_ratio": o["ratio"], "overhead_met": o["met"], "overhead_ratio_cpu_time": o["ratio_cpu_time"],
        "load_average_start": report["load_average_start"][0], "load_average_end": report["load_average_end"][0],
        "autoscale_peak_replicas": a["peak_replicas"], "autoscale_down_s": a["scale_down_s_after_idle"],
        "autoscale_met": a["met"],
        "overload_lost": report["overload"]["lost"], "overload_met": report["overload"]["met"],
        "overload_statuses": report["overload"]["statuses"],
        "kill_recovery_s": report["kill"]["recovery_s"], "kill_first_ok_s": report["kill"]["first_ok_after_kill_s"],
        "kill_failed": report["kill"]["failed"], "kill_unaccounted": report["kill"]["unaccounted"],
        "bad_inputs": report["bad_inputs"]["n"], "bad_inputs_all_4xx": report["bad_inputs"]["all_4xx_clear"],
        "healthy_after_bad_inputs": report["bad_inputs"]["healthy_after"],
    }


def plot(report: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_std, has_mixed = "throughput" in report, "mixed" in report
    fig, grid = plt.subplots(has_std + has_mixed, 3, figsize=(15, 4.2 * (has_std + has_mixed)), squeeze=False)
    if has_std:
        axes = grid[0]
        t = report["throughput"]
        rows = [("naive\nfull 50, bs 1", t["naive"]), ("auto\nbs 1", report["batching"]["request_max_batch_size_1"]),
                ("auto\nstep", t["auto"]), ("auto step\nsaturated", report["overhead"]["service"])]
        ax = axes[0]
        ax.bar([r[0] for r in rows], [r[1]["images_per_s"] for r in rows], color=["#999", "#7aa", "#3a7", "#385"])
        ax.axhline(report["overhead"]["in_process"]["images_per_s"], color="k", ls="--", lw=1,
                   label="in-process Generator")
        ax.set_ylabel("images / s")
        ax.set_title(f"throughput (auto vs naive: {t['speedup']:.1f}x)")
        ax.legend(fontsize=8)
        ax = axes[1]
        x = np.arange(3)
        for k, (name, r) in enumerate(rows[:3]):
            lat = r["latency_s"]
            ax.bar(x + (k - 1) * 0.27, [lat["p50"], lat["p95"], lat["p99"]], 0.27, label=name.replace("\n", " "))
        ax.set_xticks(x, ["p50", "p95", "p99"])
        ax.set_yscale("log")
        ax.set_ylabel("latency (s)")
        ax.set_title("latency")
        ax.legend(fontsize=8)
        ax = axes[2]
        a = report["autoscale"]
        tl = a["timeline"]
        ax.step([s["t"] for s in tl], [s.get("RUNNING", 0) for s in tl], where="post", label="running replicas")
        ax.step([s["t"] for s in tl], [sum(v for k, v in s.items() if k != "t") for s in tl], where="post",
                ls=":", label="all replicas (incl. starting/stopping)")
        for key, label in (("t_high_start", "high load"), ("t_idle_start", "idle")):
            ax.axvline(a[key], color="grey", lw=1, ls="--")
            ax.text(a[key], 0.1, f" {label}", fontsize=8)
        ax.set_ylim(0, 3)
        ax.set_xlabel("seconds")
        ax.set_title("autoscaling under a load step")
        ax.legend(fontsize=8, loc="upper right")
    if has_mixed:
        plot_mixed(grid[-1], report["mixed"])
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def plot_mixed(axes, m: dict) -> None:
    """Mixed traffic: p95 per kind at each load (request vs step), the probe, saturation."""
    loads = sorted(m["loads"], key=float)
    kinds = [k for k in MIX_BODIES if any(k in m["loads"][ld][md]["by_kind"] for ld in loads for md in m["loads"][ld])]
    ax = axes[0]
    x = np.arange(len(kinds))
    width = 0.8 / (2 * len(loads))
    for j, load in enumerate(loads):
        for k, (mode, color) in enumerate((("request", "#c66"), ("step", "#3a7"))):
            r = m["loads"][load].get(mode, {}).get("by_kind", {})
            vals = [r.get(kind, {}).get("p95") or 0 for kind in kinds]
            ax.bar(x + (2 * j + k - len(loads)) * width + width / 2, vals, width, color=color,
                   alpha=0.4 + 0.6 * (j + 1) / len(loads),
                   label=f"{mode} {float(load):.0%}")
    ax.set_xticks(x, kinds)
    ax.set_yscale("log")
    ax.set_ylabel("p95 latency (s)")
    ax.set_title("mixed traffic: p95 by mode, request vs step")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    s = m["summary"]
    names = ["auto alone", "auto after 4x50\n(request)", "auto after 4x50\n(step)"]
    vals = [m["alone_latency_s"]["step"]["auto"], m["probe"]["request"]["median_s"], m["probe"]["step"]["median_s"]]
    ax.bar(names, vals, color=["#999", "#c66", "#3a7"])
    ax.set_ylabel("latency (s)")
    ax.set_title(f"probe: step {s['probe_step_vs_alone']}x alone, request {s['probe_request_vs_alone']}x")
    ax = axes[2]
    sat = m["saturation"]
    ax.bar(["request", "step"], [sat["request"]["images_per_s"], sat["step"]["images_per_s"]], color=["#c66", "#3a7"])
    ax.set_ylabel("images / s")
    ax.set_title(f"mixed saturation: step {s['saturation_step_vs_request']}x request; "
                 f"rows/call {((s['rows_per_unet_call'] or {}).get('saturation'))}")


def scaled_mixed(mx: Mixed, scale: float) -> Mixed:
    """``mx`` with its durations and request counts times ``scale`` (a quick check of the scenario)."""
    def count(n: int) -> int:
        return max(1, int(round(n * scale)))

    return dataclasses.replace(
        mx, duration_s=mx.duration_s * scale, alone_requests=count(mx.alone_requests),
        saturation_requests=count(mx.saturation_requests),
        adaptive_share=dataclasses.replace(mx.adaptive_share, requests=count(mx.adaptive_share.requests)),
        probe=dataclasses.replace(mx.probe, repeats=count(mx.probe.repeats)),
        burst=dataclasses.replace(mx.burst, requests=count(mx.burst.requests), at_s=mx.burst.at_s * scale))


@command
def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.bench_serve`` runs the stage (every scenario, reports/). For a
    check: ``--only mixed|standard`` and ``--scale F`` (mixed durations and counts times F) write to
    ``--out-dir`` instead."""
    import argparse
    import sys
    from pathlib import Path

    from budgetdiff.io import atomic_write_bytes, atomic_write_json
    from mlops.params import load_config

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_serve")
    parser.add_argument("--only", choices=("standard", "mixed"), default=None)
    parser.add_argument("--scale", type=float, default=None)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if (args.only or args.scale is not None) and not args.out_dir:
        sys.exit("--out-dir: required with --only or --scale (reports/ holds the full run)")
    if args.scale is not None and not 0 < args.scale <= 10:
        sys.exit(f"--scale: must be in (0, 10], got {args.scale}")
    cfg = load_config("bench_serve", BenchServeConfig)
    if args.scale is not None:
        cfg = dataclasses.replace(cfg, mixed=scaled_mixed(cfg.mixed, args.scale))
    paths = {k: getattr(cfg, k) for k in ("report_path", "headline_path", "plot_path", "screenshot_path")}
    if args.out_dir:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        paths = {k: str(Path(args.out_dir) / Path(v).name) for k, v in paths.items()}
        cfg = dataclasses.replace(cfg, screenshot_path=paths["screenshot_path"])
    report = run(cfg, only=args.only)
    atomic_write_json(paths["report_path"], report)
    atomic_write_json(paths["headline_path"], headline(report))
    atomic_write_bytes(paths["plot_path"], plot(report))
    print(json.dumps(headline(report)))


if __name__ == "__main__":
    main()
