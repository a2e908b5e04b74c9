"""Benchmark stage ``bench_auto``: every engine mode, and ``auto``, on the same held-out prompts.

All images come from one ``Generator`` (models/bundle) in one process, on ``prompts`` held-out
scene prompts (1-4 objects; a seed range of their own; image i uses the same seed in every run).
Runs: ``full`` (50 steps, the reference), ``budget``, ``adaptive``, ``student``, ``auto``, ``auto``
at each quality target, and the baseline a user would otherwise pick: the base model with uniform
steps at auto's mean NFE (and at auto's mean UNet GFLOPs, since auto's student route may skip the
unconditional branch). Per run:
- NFE and UNet GFLOPs per image (``torch.utils.flop_counter`` on one evaluation per model and CFG
  setting, times each image's evaluations) and images/s in this process at ``batch_size``;
- each level against the full 50-step image of the same seed: pixel/ssim, pixel/psnr,
  mid/lpips_alex_randinit (LPIPS without ImageNet weights), high/iclip_domainclip, and the
  realised quality (the lowest of SSIM, 1 − LPIPS, I-CLIP: what ``quality_target`` asks for);
- against the prompt: high/clipt_domainclip and domain/attr_acc; and dist/fd_domainclip against
  the rendered ground-truth scenes.
Also the engine's overhead: the same batched pipeline calls made directly and through the
``Generator``, alternated, in this process.

Writes reports/auto.json (every number, targets with pass/fail, quality-target calibration) and
reports/auto.png (UNet GFLOPs per image against quality).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.bench_distill import rendered
from budgetdiff.generation.engine import GenerationRequest, Generator
from budgetdiff.domain.evaluators import load_attribute_checker
from budgetdiff.io import atomic_write_bytes, atomic_write_json
from budgetdiff.metrics import MetricScorer, ScoringConfig
from budgetdiff.metrics.semantic import load_clip_backbone
from budgetdiff.io.fingerprint import content_sha256, unet_fingerprint
from budgetdiff.statistics.quality import coverage_held, mean_quality, realised_quality
from budgetdiff.domain.scenes import held_out_scenes
from mlops.cli import command
from mlops.params import load_config

FD, CLIPT, ATTR = "dist/fd_domainclip", "high/clipt_domainclip", "domain/attr_acc"
LEVELS = ("pixel/ssim", "pixel/psnr", "mid/lpips_alex_randinit", "high/iclip_domainclip")


class BenchAutoError(ValueError):
    """A params value bench_auto cannot run with."""


@dataclass(frozen=True)
class Overhead:
    """The engine-overhead measurement: prompts, steps per image, alternated repeats."""

    prompts: int
    steps: int
    repeats: int


@dataclass(frozen=True)
class Targets:
    min_gflops_reduction: float
    attr_acc_tolerance: float
    clipt_tolerance: float
    max_overhead_pct: float


@dataclass(frozen=True)
class BenchAutoConfig:
    """The ``bench_auto`` section of params.yaml."""

    bundle: str
    prompts: int
    count_weights: tuple[float, ...]
    seed_offset: int
    batch_size: int
    full_steps: int
    quality_targets: list[float]
    overhead: Overhead
    targets: Targets
    clip_dir: str
    attributes_dir: str
    report_path: str
    headline_path: str
    plot_path: str
    cache_dir: str


def run_mode(gen: Generator, requests: list[GenerationRequest], batch_size: int, desc: str):
    """(images (N, 3, H, W) in [0, 1], records, seconds) for one run through the engine."""
    bar = tqdm(total=len(requests), desc=desc, unit="image", leave=False)
    start = time.perf_counter()
    results = gen(requests, output_type="pt", batch_size=batch_size, progress=bar.update)
    seconds = time.perf_counter() - start
    bar.close()
    return torch.stack([r.image.cpu() for r in results]), [r.record.to_dict() for r in results], seconds


def engine_overhead(gen: Generator, prompts: list[str], steps: int, batch_size: int, repeats: int) -> dict:
    """Wall-clock of the same batched pipeline calls made directly and through the Generator,
    alternated ``repeats`` times; the overhead is the ratio of the medians."""
    pipe = gen.models["base"].pipe
    guidance = pipe.config.default_guidance_scale
    requests = [GenerationRequest(p, mode="full", steps=steps, seed=i) for i, p in enumerate(prompts)]

    def direct():
        for i in range(0, len(prompts), batch_size):
            pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                 scheduler=gen.base_scheduler, seed=list(range(i, min(i + batch_size, len(prompts)))),
                 output_type="pt", progress=False)

    def engine():
        gen(requests, output_type="pt", batch_size=batch_size)

    times = {"direct": [], "engine": []}
    direct()  # warm-up
    for r in range(repeats):
        for name, fn in (("direct", direct), ("engine", engine)) if r % 2 == 0 else (("engine", engine), ("direct", direct)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    d, e = float(np.median(times["direct"])), float(np.median(times["engine"]))
    return {"prompts": len(prompts), "steps": steps, "batch_size": batch_size, "repeats": repeats,
            "direct_seconds": times["direct"], "engine_seconds": times["engine"],
            "overhead_pct": round(100 * (e / d - 1), 3)}


def record_gflops(record: dict, per_evaluation: dict) -> float:
    """UNet GFLOPs of one image: the engine's record, or (records cached before it carried them)
    its evaluations times one evaluation's GFLOPs."""
    if "unet_gflops" in record:
        return float(record["unet_gflops"])
    return record["nfe"] * per_evaluation[(record["model"]["name"], record["cfg"])]


def summarize(name: str, records: list[dict], seconds: float, values: dict[str, np.ndarray], fd: float,
              per_evaluation: dict) -> dict:
    nfe = np.array([r["nfe"] for r in records], dtype=float)
    per_image_gflops = np.array([record_gflops(r, per_evaluation) for r in records])
    quality = realised_quality(values)
    routes: dict[str, int] = {}
    for r in records:
        route = (r["policy"].get("auto") or {}).get("route") or r["model"]["name"]
        routes[route] = routes.get(route, 0) + 1
    out = {"mode": records[0]["mode"], "nfe": float(nfe.mean()), "gflops_per_image": float(per_image_gflops.mean()),
           "images_per_second": len(records) / seconds, "seconds": round(seconds, 2),
           "steps_mean": float(np.mean([r["steps"] for r in records])), "routes": routes,
           "quality": mean_quality(quality), FD: fd,
           **{k: float(np.nanmean(v)) for k, v in values.items() if k in LEVELS or k in (CLIPT, ATTR)}}
    return out


def quality_plot(results: dict, full: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, key, label in ((axes[0], "quality", "realised quality vs full-50 image (min of SSIM, 1-LPIPS, I-CLIP)"),
                           (axes[1], ATTR, "domain/attr_acc (prompt attributes found)")):
        for name, r in results.items():
            marker = "*" if name.startswith("auto") else ("s" if name.startswith("uniform") else "o")
            ax.scatter(r["gflops_per_image"], r[key], marker=marker, s=120 if marker == "*" else 50)
            ax.annotate(name, (r["gflops_per_image"], r[key]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("UNet GFLOPs per image (log)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].axhline(results[full][ATTR] - 0.01, color="gray", ls="--", lw=0.8)
    axes[1].text(results[full]["gflops_per_image"], results[full][ATTR] - 0.01, "full-50 - 0.01", fontsize=7,
                 ha="right", va="top", color="gray")
    fig.suptitle("bench_auto: cost against quality, every engine mode (same prompts and seeds)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def check_targets(results: dict, overhead: dict, t: Targets) -> dict:
    full, auto = results["full"], results["auto"]
    ratio = full["gflops_per_image"] / auto["gflops_per_image"]
    uniform = results["uniform_equal_nfe"]
    return {
        "auto_gflops_reduction": {"measured": round(ratio, 3), "target": f">= {t.min_gflops_reduction}x",
                                  "met": ratio >= t.min_gflops_reduction},
        "auto_attr_acc_within": {"measured": round(auto[ATTR] - full[ATTR], 5),
                                 "target": f">= -{t.attr_acc_tolerance} vs full-50",
                                 "met": auto[ATTR] >= full[ATTR] - t.attr_acc_tolerance},
        "auto_clipt_within": {"measured": round(auto[CLIPT] - full[CLIPT], 5),
                              "target": f">= -{t.clipt_tolerance} vs full-50",
                              "met": auto[CLIPT] >= full[CLIPT] - t.clipt_tolerance},
        "auto_vs_uniform_equal_nfe": {
            "uniform_steps": uniform["steps_mean"],
            "attr_acc": {"auto": auto[ATTR], "uniform": uniform[ATTR], "met": auto[ATTR] >= uniform[ATTR]},
            "fd": {"auto": auto[FD], "uniform": uniform[FD], "met": auto[FD] <= uniform[FD]}},
        "engine_overhead": {"measured_pct": overhead["overhead_pct"], "target": f"<= {t.max_overhead_pct} %",
                            "met": overhead["overhead_pct"] <= t.max_overhead_pct},
    }


def calibration(results: dict, per_image_quality: dict, targets: list[float], coverage: float | None = None
                ) -> list[dict]:
    """For each quality target q: the share of prompts whose realised quality reaches q (the auto
    policy promises ``coverage``), and the mean cost, of auto run with that target."""
    rows = []
    for q in targets:
        name = f"auto_q{q:g}"
        quality = per_image_quality[name]
        # the share's one-sided 95 % Wilson bounds: the promise is held unless the upper one is below it
        held = coverage_held(quality, q, coverage if coverage is not None else 0.0)
        rows.append({"quality_target": q, "share_reaching_target": held["share"],
                     "share_lower_95": held["lower"], "promised_coverage": coverage,
                     "promise_met": None if coverage is None else held["held"],
                     "mean_realised_quality": mean_quality(quality), "nfe": results[name]["nfe"],
                     "gflops_per_image": results[name]["gflops_per_image"], "routes": results[name]["routes"]})
    return rows


def check_params(cfg: BenchAutoConfig) -> None:
    """The values the types do not rule out: counts >= 1, quality targets in (0, 1]."""
    for key in ("prompts", "batch_size", "full_steps"):
        if getattr(cfg, key) < 1:
            raise BenchAutoError(f"bench_auto.{key}: must be an integer >= 1, got {getattr(cfg, key)!r}")
    for q in cfg.quality_targets:
        if not 0 < q <= 1:
            raise BenchAutoError(f"bench_auto.quality_targets: {q} is outside (0, 1]")


def run(cfg: BenchAutoConfig) -> dict:
    check_params(cfg)
    torch.manual_seed(0)
    gen = Generator.load(cfg.bundle)
    scorer = MetricScorer(ScoringConfig(batch_size=256), clip=load_clip_backbone(cfg.clip_dir),
                          checker=load_attribute_checker(cfg.attributes_dir))
    specs, prompts = held_out_scenes(cfg.prompts, cfg.seed_offset, count_weights=cfg.count_weights)
    truth = rendered(specs)
    seeds = [cfg.seed_offset + i for i in range(len(prompts))]
    gflops = gen.gflops_per_evaluation
    cache = Path(cfg.cache_dir)
    # a run depends on the whole bundle only in auto mode: other modes are cached across auto-policy changes
    models_key = [gen.skip_policy.sha256, *(unet_fingerprint(m.path) for m in gen.models.values())]
    no_auto_key = [content_sha256({k: v for k, v in gen.bundle.raw.items() if k != "auto"}), *models_key]
    auto_key = [gen.bundle.sha256, *models_key]

    def requests_for(mode: str, **kw) -> list[GenerationRequest]:
        return [GenerationRequest(p, mode=mode, seed=s, **kw) for p, s in zip(prompts, seeds)]

    images, records, secs = {}, {}, {}

    def measure(name: str, requests: list[GenerationRequest]) -> None:
        bundle_key = auto_key if any(r.mode == "auto" for r in requests) else no_auto_key
        key = content_sha256([bundle_key, name, [r.__repr__() for r in requests], cfg.batch_size])
        path = cache / f"{name}_{key}.pt"
        if path.is_file():
            saved = torch.load(path, weights_only=False)
            images[name], records[name], secs[name] = saved["images"], saved["records"], saved["seconds"]
            print(f"[{name}] resumed from {path}", flush=True)
            return
        images[name], records[name], secs[name] = run_mode(gen, requests, cfg.batch_size, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"images": images[name], "records": records[name], "seconds": secs[name]}, tmp)
        tmp.replace(path)
        print(f"[{name}] {len(requests)} images in {secs[name]:.1f} s, mean NFE "
              f"{np.mean([r['nfe'] for r in records[name]]):.2f}", flush=True)

    start = time.time()
    measure("full", requests_for("full", steps=cfg.full_steps))
    for mode in ("budget", "adaptive", "student", "auto"):
        measure(mode, requests_for(mode))
    for q in cfg.quality_targets:
        measure(f"auto_q{q:g}", requests_for("auto", quality_target=q))
    auto_nfe = float(np.mean([r["nfe"] for r in records["auto"]]))
    auto_gflops = float(np.mean([record_gflops(r, gflops) for r in records["auto"]]))
    uniform_nfe = max(1, round(auto_nfe))
    uniform_gflops = max(1, round(auto_gflops / gflops[("base", True)]))
    measure("uniform_equal_nfe", requests_for("full", steps=uniform_nfe))
    if uniform_gflops != uniform_nfe:
        measure("uniform_equal_gflops", requests_for("full", steps=uniform_gflops))

    results, per_image_quality = {}, {}
    refs = images["full"]
    for name in images:
        values = scorer.score(images[name], refs=refs, prompts=prompts)
        fd = scorer.frechet_distance(truth, images[name])[FD]
        results[name] = summarize(name, records[name], secs[name], values, fd, gflops)
        per_image_quality[name] = realised_quality(values)
        r = results[name]
        print(f"[{name}] NFE {r['nfe']:.2f} GFLOPs {r['gflops_per_image']:.2f} quality {r['quality']:.4f} "
              f"attr_acc {r[ATTR]:.4f} clipt {r[CLIPT]:.4f} fd {r[FD]:.4f} img/s {r['images_per_second']:.2f}",
              flush=True)
    ov = cfg.overhead
    overhead = engine_overhead(gen, prompts[:ov.prompts], ov.steps, cfg.batch_size, ov.repeats)
    print(f"[overhead] {overhead['overhead_pct']:.2f} %", flush=True)
    full = results["full"]
    for r in results.values():
        r["gflops_reduction_vs_full"] = full["gflops_per_image"] / r["gflops_per_image"]
        r["nfe_reduction_vs_full"] = full["nfe"] / r["nfe"]
    report = {
        "prompts": len(prompts), "seed_offset": cfg.seed_offset, "batch_size": cfg.batch_size,
        "bundle": gen.bundle.describe(), "skip_policy": gen.skip_policy.describe(),
        "auto_rule": gen.bundle.auto.to_record() if gen.bundle.auto else None,
        "auto_policy": gen.auto_policy.to_dict() if gen.auto_policy else None,
        "gflops_per_evaluation": {f"{m}/{'cfg' if c else 'nocfg'}": round(v, 4) for (m, c), v in gflops.items()},
        "definitions": {"quality": "per image min(pixel/ssim, 1 - mid/lpips_alex_randinit, high/iclip_domainclip) "
                                   "against the full 50-step image of the same seed (LPIPS without ImageNet weights)",
                        FD: "Frechet distance in the domain CLIP's space to the rendered ground-truth scenes",
                        "uniform_equal_nfe": f"base model, {uniform_nfe} uniform steps (auto's mean NFE {auto_nfe:.2f})",
                        "uniform_equal_gflops": f"base model, {uniform_gflops} uniform steps "
                                                f"(auto's mean GFLOPs {auto_gflops:.2f})"},
        "results": results,
        "calibration": calibration(results, per_image_quality, cfg.quality_targets,
                                   gen.auto_policy.coverage if gen.auto_policy else None),
        "engine_overhead": overhead,
        "targets": check_targets(results, overhead, cfg.targets),
        "torch_threads": torch.get_num_threads(),
        "seconds_total": round(time.time() - start, 1),
    }
    atomic_write_bytes(cfg.plot_path, quality_plot(results, "full"))
    return report


def headline(report: dict) -> dict:
    """The few numbers a reader compares between commits (the stage's DVC metric)."""
    auto, full = report["results"]["auto"], report["results"]["full"]
    return {"auto_gflops_reduction": round(report["targets"]["auto_gflops_reduction"]["measured"], 3),
            "auto_attr_acc_minus_full": round(auto[ATTR] - full[ATTR], 5),
            "auto_clipt_minus_full": round(auto[CLIPT] - full[CLIPT], 5),
            "auto_quality": round(auto["quality"], 5), "engine_overhead_pct": report["engine_overhead"]["overhead_pct"],
            "quality_target_share_reaching": {f"{c['quality_target']:g}": round(c["share_reaching_target"], 4)
                                              for c in report["calibration"]},
            "targets_met": {k: v["met"] for k, v in report["targets"].items() if "met" in v}}


@command
def main() -> None:
    cfg = load_config("bench_auto", BenchAutoConfig)
    report = run(cfg)  # BenchAutoError is a ValueError: one line, exit 2
    atomic_write_json(cfg.report_path, report)
    atomic_write_json(cfg.headline_path, headline(report))
    print(json.dumps(report["targets"], indent=1))


if __name__ == "__main__":
    main()
