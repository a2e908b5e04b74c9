"""Benchmark stage ``bench_monitor``: does monitoring cost latency, does the quality alert fire when
quality drops (and only then), does the drift test flag what it should?

One private local Ray (``num_cpus`` from params, metrics export on a loopback port, its own temp
dir) runs the service from the bench profile with the ``ShadowEvaluator`` enabled; Debian's
Prometheus (``monitoring.prom``) scrapes it through Ray's file-SD list and evaluates
``monitoring/prometheus/rules.yml``. Every phase is bounded in requests and time; the cluster and
Prometheus are stopped at the end.

| phase | what | target |
|---|---|---|
| ``latency`` | blocks of requests alternating shadow sampling off / ``rate`` (10 %), the shadow queue drained after every block; p95 latency of served requests per condition | on <= 1.05 x off |
| ``slo`` | the normal bundle, then a deliberately degraded one (a miscalibrated auto policy that sends every request to a 2-step plan), sampled at ``slo.sample_rate``; the share of good sampled requests, and when Prometheus' quality fast-burn alert goes firing | fires under the degraded policy within a stated number of sampled requests; silent under the normal one |
| ``drift`` | ``monitoring.drift.drift_benchmark``: an out-of-domain prompt set, and in-domain held-out windows | OOD p < 0.01; in-domain flagged <= 5 % |

Writes reports/monitor.json (everything), reports/monitor_headline.json and reports/monitor.png.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from benchmarks.bench_serve import (APP, Client, ServiceUnderTest, _free_port, _percentiles, _strip, model_config,
                                    prompts)
from mlops.cli import command
from mlops.params import config_dict
from mlops.repo import REPO_ROOT



class BenchMonitorError(ValueError):
    """A params value bench_monitor cannot run with."""


@dataclass(frozen=True)
class LatencyPhase:
    sample_rate: float
    blocks: int
    block_requests: int
    concurrency: int
    target_p95_ratio: float


@dataclass(frozen=True)
class SloPhase:
    quality_target: float
    sample_rate: float
    concurrency: int
    normal_requests: int
    normal_hold_s: float
    degraded_steps: int
    degraded_chunk: int
    degraded_max_requests: int
    degraded_max_s: float
    after_load_wait_s: float
    fire_within_sampled_requests: int


@dataclass(frozen=True)
class BenchMonitorConfig(ServiceUnderTest):
    """The ``bench_monitor`` section of params.yaml."""

    prometheus_interval: str  # a Prometheus duration ("5s")
    alert_prefix: str
    fast_burn_alert: str
    latency: LatencyPhase
    slo: SloPhase
    report_path: str
    headline_path: str
    plot_path: str
    http_port: Optional[int] = None
    drift: dict[str, Any] = field(default_factory=dict)  # keyword arguments of monitoring.drift.drift_benchmark


def check_params(cfg: BenchMonitorConfig) -> None:
    """The values the types do not rule out."""
    lat, slo = cfg.latency, cfg.slo
    if lat.blocks < 2 or lat.blocks % 2:
        raise BenchMonitorError(f"bench_monitor.latency.blocks: must be an even number >= 2, got {lat.blocks!r}")
    if not 0 < lat.sample_rate <= 1:
        raise BenchMonitorError(f"bench_monitor.latency.sample_rate: must be in (0, 1], got {lat.sample_rate!r}")
    if not 0 < slo.quality_target <= 1:
        raise BenchMonitorError(f"bench_monitor.slo.quality_target: must be in (0, 1], got {slo.quality_target!r}")
    for key in ("normal_requests", "degraded_max_requests", "concurrency"):
        if getattr(slo, key) < 1:
            raise BenchMonitorError(f"bench_monitor.slo.{key}: must be >= 1, got {getattr(slo, key)!r}")


# ----------------------------------------------------------------------------------------------
# The degraded bundle: what a bad policy rollout looks like
# ----------------------------------------------------------------------------------------------
def degraded_bundle(bundle_dir: str, out_dir: Path, steps: int) -> Path:
    """A copy of ``bundle_dir``'s bundle.json (model paths pointing at the originals) with a
    miscalibrated auto policy: one candidate, the base model at ``steps`` steps, claimed to reach
    realised quality 1.0 for every request. What a bad calibration rollout looks like: every
    ``auto`` request, whatever its quality_target, runs ``steps`` steps."""
    from budgetdiff.methods.auto_policy import AutoCandidate, AutoPolicy
    from budgetdiff.generation.bundle import load_bundle

    src = Path(bundle_dir).resolve()
    bundle = load_bundle(src)
    raw = json.loads((src / "bundle.json").read_text())
    for key in ("base", "student", "budget"):
        part = raw.get(key)
        if isinstance(part, dict) and part.get("path"):
            part["path"] = str((src / part["path"]).resolve())
    good = bundle.auto.policy
    if good is None:
        raise BenchMonitorError(f"bench_monitor.model_source: {bundle_dir} has no calibrated auto policy")
    name = f"base@{steps} (miscalibrated)"
    bad = AutoPolicy(good.scheduler, good.coverage, good.tolerances, name, (
        AutoCandidate(name, "uniform", "base", steps=int(steps), measured={
            "gflops_per_image": 0.0, "quality_lower_bound": {f"{c:g}": 1.0 for c in (0.8, 0.9, 0.95, good.coverage)},
            "note": "deliberately wrong: bench_monitor's degraded policy"}),),
        good.reference, {"stage": "bench_monitor", "default_rule": "degraded on purpose"})
    raw["auto"]["policy"] = bad.to_dict()
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / raw["skip_policy"], out_dir / raw["skip_policy"])
    (out_dir / "bundle.json").write_text(json.dumps(raw, indent=2))
    load_bundle(out_dir)  # still a valid bundle
    return out_dir


# ----------------------------------------------------------------------------------------------
# Cluster helpers
# ----------------------------------------------------------------------------------------------
def _handle(name: str):
    from ray import serve

    return serve.get_deployment_handle(name, APP)


def model_info() -> dict:
    return _handle("ImageModel").info.remote().result(timeout_s=120)


def shadow_summary() -> dict:
    return _handle("ShadowEvaluator").summary.remote().result(timeout_s=120)


def wait_shadow_drained(timeout_s: float) -> dict:
    """Wait until every job the model replica sent has an answer from the shadow (its queue empty)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info, summary = model_info(), shadow_summary()
        sh = info.get("shadow") or {}
        done = summary.get("evaluated", 0) + summary.get("errors", 0)
        if sh.get("depth", 0) == 0 and done >= sh.get("sent", 0) + 0 and sh.get("queued", 0) <= \
                sh.get("sent", 0) + sh.get("failed", 0):
            return {"model": sh, "shadow_evaluated": summary.get("evaluated"), "shadow_errors": summary.get("errors")}
        if time.monotonic() > deadline:
            raise RuntimeError(f"shadow: not drained within {timeout_s:.0f}s (model {sh}, shadow done {done})")
        time.sleep(1.0)


def deploy(config: dict, url: str, progress, what: str) -> float:
    from serving.deploy import run_in_process

    progress(f"[bench_monitor] deploy: {what}")
    start = time.perf_counter()
    served = run_in_process(config, wait_s=900)  # returns once a user_config change reaches the replicas
    if served != url:
        raise RuntimeError(f"bench_monitor: the config serves {served}, not {url}")
    return round(time.perf_counter() - start, 2)


def wait_model(pred, timeout_s: float = 900) -> dict:
    """Poll the model replica's info until ``pred(info)``; reconfigure applies asynchronously."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            info = model_info()
            if pred(info):
                return info
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("model replica: the new user_config did not apply in time")
        time.sleep(1.0)


class Prometheus:
    """``monitoring.prom`` start/stop around the benchmark, and the alerts API."""

    def __init__(self, temp_dir: str, workdir: Path, interval: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = workdir
        self.args = ["--temp-dir", temp_dir, "--listen", f"127.0.0.1:{self.port}", "--scrape-interval", interval,
                     "--sd-refresh-interval", interval]

    def start(self) -> None:
        proc = subprocess.run([sys.executable, "-m", "monitoring.prom", "start", *self.args, "--dir", str(self.dir),
                               "--retention", "1d"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"prometheus did not start: {(proc.stderr or proc.stdout).strip()[-400:]}")

    def stop(self) -> None:
        subprocess.run([sys.executable, "-m", "monitoring.prom", "stop", "--dir", str(self.dir)], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as r:
            return json.loads(r.read())

    def alerts(self, prefix: str) -> list[dict]:
        return [a for a in self.get("/api/v1/alerts")["data"]["alerts"]
                if a["labels"].get("alertname", "").startswith(prefix)]

    def query(self, expr: str) -> list:
        import urllib.parse

        return self.get("/api/v1/query?query=" + urllib.parse.quote(expr))["data"]["result"]


def wait_for_ray_target(prom: "Prometheus", timeout_s: float) -> None:
    """Wait until Prometheus scrapes a Ray metrics target (found through Ray's file-SD list)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        targets = prom.get("/api/v1/targets")["data"]["activeTargets"]
        if any(t["health"] == "up" and t["labels"].get("job") != "prometheus" for t in targets):
            return
        time.sleep(2)
    raise RuntimeError(f"prometheus: no Ray metrics target up within {timeout_s:.0f}s "
                       f"(targets: {[(t['scrapeUrl'], t['health']) for t in targets]})")


def alert_watch(prom: Prometheus, prefix: str, period_s: float, stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        try:
            alerts = prom.alerts(prefix)
            summary = shadow_summary()
            out.append({"t": time.monotonic(), "alerts": [(a["labels"]["alertname"], a["state"]) for a in alerts],
                        "evaluated": summary.get("evaluated"), "slo": summary.get("slo")})
        except Exception as exc:
            out.append({"t": time.monotonic(), "error": str(exc)[:200]})
        stop.wait(period_s)


# ----------------------------------------------------------------------------------------------
# The phases
# ----------------------------------------------------------------------------------------------
def latency_phase(cfg: BenchMonitorConfig, base: dict, client: Client, url: str, bodies, progress) -> dict:
    lat = cfg.latency
    rate = lat.sample_rate
    blocks, per_block = lat.blocks, lat.block_requests
    latencies: dict[str, list[float]] = {"off": [], "on": []}
    timeline = []
    sampled = 0
    for b in range(blocks):
        cond = "off" if b % 2 == 0 else "on"
        r = rate if cond == "on" else 0.0
        config = model_config(base, replicas=1, torch_threads=cfg.torch_threads, shadow_sample_rate=r)
        deploy(config, url, progress, f"latency block {b + 1}/{blocks}: shadow {cond} (rate {r})")
        wait_model(lambda info: (info.get("shadow") or {}).get("rate") == r)
        out = asyncio.run(client.closed_loop(bodies(per_block, 100_000 + b * per_block), lat.concurrency))
        lats = [x["latency_s"] for x in out["_results"] if x["status"] == 200]
        latencies[cond].extend(lats)
        drained = wait_shadow_drained(900)
        timeline.append({"block": b, "condition": cond, "rate": r, **_strip(out), "shadow": drained})
        progress(f"[bench_monitor] block {b + 1}: {cond} p95 {np.percentile(lats, 95):.2f}s "
                 f"({out['ok']}/{out['requests']} ok), shadow {drained['model']}")
    sampled = timeline[-1]["shadow"]["model"].get("queued", 0)
    p_off, p_on = _percentiles(latencies["off"]), _percentiles(latencies["on"])
    ratio = p_on["p95"] / p_off["p95"] if p_off["p95"] else None
    return {"sample_rate": rate, "blocks": blocks, "block_requests": per_block, "concurrency": lat.concurrency,
            "latency_s": {"off": p_off, "on": p_on}, "p95_ratio_on_off": round(ratio, 4) if ratio else None,
            "images_sampled": sampled, "blocks_detail": timeline, "_latencies": latencies,
            "target": {"p95_ratio_max": lat.target_p95_ratio,
                       "met": ratio is not None and ratio <= lat.target_p95_ratio}}


def slo_phase(cfg: BenchMonitorConfig, base: dict, client: Client, url: str, bodies, prom: Prometheus,
              degraded_dir: Path, progress) -> dict:
    slo = cfg.slo
    q = slo.quality_target
    conc = slo.concurrency
    threads = cfg.torch_threads
    rate = slo.sample_rate
    watch: list = []
    stop = threading.Event()
    thread = threading.Thread(target=alert_watch, args=(prom, cfg.alert_prefix, 5.0, stop, watch), daemon=True)
    out: dict = {"quality_target": q, "sample_rate": rate, "alert_prefix": cfg.alert_prefix}

    normal = model_config(base, replicas=1, torch_threads=threads, shadow_sample_rate=rate)
    deploy(normal, url, progress, f"slo: normal bundle, sampling {rate}")
    wait_model(lambda info: (info.get("shadow") or {}).get("rate") == rate)
    before = shadow_summary()
    thread.start()
    t0 = time.monotonic()
    try:
        progress(f"[bench_monitor] slo: normal policy, {slo.normal_requests} requests at quality_target {q}")
        res = asyncio.run(client.closed_loop(bodies(slo.normal_requests, 200_000, quality_target=q), conc))
        wait_shadow_drained(1800)
        # hold: give the fast-burn alert its `for:` time on the normal data
        hold_until = time.monotonic() + slo.normal_hold_s
        while time.monotonic() < hold_until:
            time.sleep(2)
        normal_summary = shadow_summary()
        out["normal"] = {**_strip(res), "shadow": _slo_delta(before, normal_summary),
                         "t_end": round(time.monotonic() - t0, 1)}
        progress(f"[bench_monitor] slo: normal share good {out['normal']['shadow']}")

        degraded = copy.deepcopy(normal)
        degraded = model_config(degraded, replicas=1, torch_threads=threads, shadow_sample_rate=rate,
                                model_source=str(degraded_dir))
        deploy(degraded, url, progress, "slo: degraded bundle")
        wait_model(lambda info: str(degraded_dir) in json.dumps(info.get("version", {})))
        t_degraded = time.monotonic() - t0
        fired_at = None
        sent = 0
        deadline = time.monotonic() + slo.degraded_max_s
        chunk = slo.degraded_chunk
        while sent < slo.degraded_max_requests and time.monotonic() < deadline:
            asyncio.run(client.closed_loop(bodies(chunk, 300_000 + sent, quality_target=q), conc))
            sent += chunk
            firing = [w for w in watch
                      if any(n == cfg.fast_burn_alert and s == "firing" for n, s in w.get("alerts", []))]
            if firing:
                fired_at = firing[0]
                break
        if fired_at is None:  # the load is over: let the shadow catch up and the `for:` clause run
            end = time.monotonic() + slo.after_load_wait_s
            while time.monotonic() < end and fired_at is None:
                time.sleep(2)
                firing = [w for w in watch if any(n == cfg.fast_burn_alert and s == "firing"
                                                  for n, s in w.get("alerts", []))]
                fired_at = firing[0] if firing else None
        final = shadow_summary()
        out["degraded"] = {"requests_sent": sent, "t_start": round(t_degraded, 1),
                           "shadow": _slo_delta(normal_summary, final)}
    finally:
        stop.set()
        thread.join(10)
    normal_firing = [w for w in watch if w["t"] - t0 < out.get("normal", {}).get("t_end", 0)
                     and any(s == "firing" for _, s in w.get("alerts", []))]
    out["normal"]["alerts_fired"] = sorted({n for w in normal_firing for n, s in w["alerts"] if s == "firing"})
    if fired_at is not None:
        evaluated_at_fire = fired_at["evaluated"] - normal_summary["evaluated"]
        out["degraded"]["fast_burn_fired"] = True
        out["degraded"]["fired_after_s"] = round(fired_at["t"] - t0 - t_degraded, 1)
        out["degraded"]["fired_after_sampled_requests"] = evaluated_at_fire
    else:
        out["degraded"]["fast_burn_fired"] = False
    out["timeline"] = [{**{k: v for k, v in w.items() if k != "slo"}, "t": round(w["t"] - t0, 1),
                        "share_good": (w.get("slo") or {}).get("share_good")} for w in watch]
    out["t_degraded"] = round(t_degraded, 1)
    limit = slo.fire_within_sampled_requests
    out["target"] = {
        "normal_silent": not out["normal"]["alerts_fired"],
        "degraded_fires": bool(out["degraded"]["fast_burn_fired"]),
        "fire_within_sampled_requests": limit,
        "met": (not out["normal"]["alerts_fired"]) and bool(out["degraded"]["fast_burn_fired"])
        and out["degraded"].get("fired_after_sampled_requests", limit + 1) <= limit,
    }
    return out


def _slo_delta(before: dict, after: dict) -> dict:
    """The SLO over the evaluations between two shadow summaries (the summary keeps verdict counts)."""
    b, a = before.get("slo") or {}, after.get("slo") or {}
    n = (a.get("n") or 0) - (b.get("n") or 0)
    good = (a.get("good") or 0) - (b.get("good") or 0)
    return {"evaluated": (after.get("evaluated") or 0) - (before.get("evaluated") or 0), "scored": n, "good": good,
            "share_good": round(good / n, 4) if n else None, "errors": (after.get("errors") or 0) - (before.get("errors") or 0)}


def run(cfg: BenchMonitorConfig, progress=print) -> dict:
    import ray
    from ray import serve

    from monitoring.names import LATENCY_MS_BUCKETS
    from serving.config import load_serve_config, with_overrides
    from serving.deploy import base_url

    check_params(cfg)
    t_start = time.perf_counter()
    key = secrets.token_hex(16)
    os.environ["BENCH_MONITOR_API_KEY"] = key
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ["RAY_SERVE_REQUEST_LATENCY_BUCKETS_MS"] = ",".join(str(b) for b in LATENCY_MS_BUCKETS)
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")  # a busy 2-core machine starts the proxy slowly
    work = Path(tempfile.mkdtemp(prefix="bench_monitor_"))
    temp_dir = str(work / "ray")
    # requests without quality_target (the latency phase) are judged by their auto route's promise
    shadow_cfg = {"enabled": True, "mlflow_log_every": 0, "drift_window": 0}
    base = with_overrides(load_serve_config(cfg.config), http_port=cfg.http_port or _free_port(),
                          model_source=cfg.model_source, ingress={"api_key_env": "BENCH_MONITOR_API_KEY"},
                          shadow={**shadow_cfg, "model_source": str(Path(cfg.model_source).resolve())})
    all_prompts = prompts(cfg.prompts, cfg.prompt_seed)

    def bodies(n: int, seed0: int = 0, **extra) -> list[dict]:
        return [{"prompt": all_prompts[(seed0 + i) % len(all_prompts)], "seed": seed0 + i, **extra} for i in range(n)]

    report: dict = {"config": config_dict(cfg), "cpus": os.cpu_count(), "load_average_start": os.getloadavg()}
    degraded_dir = degraded_bundle(cfg.model_source, work / "degraded_bundle", cfg.slo.degraded_steps)
    metrics_port = _free_port()
    # the dashboard writes the Prometheus file-SD list (<temp_dir>/prom_metrics_service_discovery.json)
    # that monitoring.prom scrapes, as on a `make serve` cluster
    ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=_free_port(), log_to_driver=False, _temp_dir=temp_dir, _metrics_export_port=metrics_port)
    prom = Prometheus(temp_dir, work / "prometheus", cfg.prometheus_interval)
    try:
        url = base_url(base)
        client = Client(url, key, cfg.request_timeout_s)
        warm = model_config(base, replicas=1, torch_threads=cfg.torch_threads, shadow_sample_rate=0.0)
        report["deploy_s"] = deploy(warm, url, progress, "warm-up")
        asyncio.run(client.closed_loop(bodies(4, 50_000), 4))
        prom.start()
        progress(f"[bench_monitor] prometheus at {prom.url}")
        wait_for_ray_target(prom, 120)
        report["latency"] = latency_phase(cfg, base, client, url, bodies, progress)
        report["slo"] = slo_phase(cfg, base, client, url, bodies, prom, degraded_dir, progress)
        try:
            report["prometheus_targets"] = [t["health"] for t in prom.get("/api/v1/targets")["data"]["activeTargets"]]
            report["prometheus_series_seen"] = {
                name: bool(prom.query(name)) for name in (
                    "ray_budgetdiff_requests_total", "ray_budgetdiff_shadow_evaluations_total",
                    "ray_budgetdiff_realised_quality_bucket", "ray_serve_num_http_requests_total")}
        except Exception as exc:
            report["prometheus_targets"] = str(exc)[:200]
    finally:
        prom.stop()
        try:
            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
    progress("[bench_monitor] drift")
    from monitoring.drift import drift_benchmark

    report["drift"] = drift_benchmark(**cfg.drift)
    report["seconds_total"] = round(time.perf_counter() - t_start, 1)
    report["load_average_end"] = os.getloadavg()
    shutil.rmtree(work, ignore_errors=True)
    return report


def headline(report: dict) -> dict:
    lat, slo, drift = report["latency"], report["slo"], report["drift"]
    return {
        "latency_p95_ratio_shadow_on_off": lat["p95_ratio_on_off"],
        "latency_target_met": lat["target"]["met"],
        "slo_normal_share_good": slo["normal"]["shadow"]["share_good"],
        "slo_degraded_share_good": slo["degraded"]["shadow"]["share_good"],
        "quality_alert_fired_under_degraded": slo["degraded"]["fast_burn_fired"],
        "quality_alert_fired_after_sampled_requests": slo["degraded"].get("fired_after_sampled_requests"),
        "quality_alert_silent_under_normal": slo["target"]["normal_silent"],
        "slo_target_met": slo["target"]["met"],
        "drift_ood_flagged": drift["out_of_domain"]["flagged"],
        "drift_ood_pvalues": [drift["out_of_domain"]["mmd_pvalue"], drift["out_of_domain"]["c2st_pvalue"]],
        "drift_in_domain_false_positive_rate": drift["in_domain"]["false_positive_rate"],
        "drift_target_met": drift["pass"],
    }


def plot(report: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    ax = axes[0]
    for cond, color in (("off", "tab:blue"), ("on", "tab:orange")):
        lats = np.sort(report["latency"]["_latencies"][cond])
        if len(lats):
            ax.plot(lats, np.arange(1, len(lats) + 1) / len(lats), color=color,
                    label=f"shadow {cond} (p95 {np.percentile(lats, 95):.2f}s)")
    ax.axhline(0.95, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("request latency (s)")
    ax.set_ylabel("share of requests")
    ax.set_title(f"latency with shadow sampling {report['latency']['sample_rate']:.0%} vs off")
    ax.legend(fontsize=8)
    ax = axes[1]
    tl = [w for w in report["slo"]["timeline"] if w.get("share_good") is not None]
    ax.plot([w["t"] for w in tl], [w["share_good"] for w in tl], label="cumulative share good (shadow)")
    ax.axvline(report["slo"]["t_degraded"], color="red", ls="--", lw=1)
    ax.text(report["slo"]["t_degraded"], 0.05, " degraded policy", color="red", fontsize=8)
    fired = [w["t"] for w in report["slo"]["timeline"] if any(s == "firing" for _, s in w.get("alerts", []))]
    if fired:
        ax.axvline(fired[0], color="black", lw=1)
        ax.text(fired[0], 0.15, " alert firing", fontsize=8)
    ax.axhline(0.95, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("seconds")
    ax.set_title(f"quality SLO (target {report['slo']['quality_target']}) and the fast-burn alert")
    ax.legend(fontsize=8, loc="lower left")
    ax = axes[2]
    d = report["drift"]
    windows = d["in_domain"].get("window_pvalues") or []
    if windows:
        ax.hist(np.log10(np.clip(windows, 1e-20, 1)), bins=20, color="tab:green", alpha=0.7,
                label=f"in-domain windows (n={len(windows)})")
    ood = min(d["out_of_domain"]["mmd_pvalue"], d["out_of_domain"]["c2st_pvalue"])
    ax.axvline(np.log10(max(2 * ood, 1e-20)), color="red", label=f"out-of-domain (Bonferroni p={min(1, 2 * ood):.2g})")
    ax.axvline(np.log10(d["alpha"]), color="grey", ls=":", label=f"alpha {d['alpha']}")
    ax.set_xlabel("log10 drift p-value (Bonferroni over MMD and C2ST)")
    ax.set_title("prompt drift")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


@command  # a BenchMonitorError (a ValueError) is one line, exit 2
def main() -> None:
    from budgetdiff.io import atomic_write_bytes, atomic_write_json
    from mlops.params import load_config

    cfg = load_config("bench_monitor", BenchMonitorConfig)
    report = run(cfg)  # check_params first, before anything starts
    plot_png = plot(report)
    report["latency"].pop("_latencies", None)
    atomic_write_json(cfg.report_path, report)
    atomic_write_json(cfg.headline_path, headline(report))
    atomic_write_bytes(cfg.plot_path, plot_png)
    print(json.dumps(headline(report)))


if __name__ == "__main__":
    main()
