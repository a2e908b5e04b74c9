"""Benchmark stage ``bench_adaptive``: how many noise predictions does AdaptiveDiffusion save on
the embedded model, at what quality, against the peers a user would try instead?

On held-out prompts of every complexity level (1 to 4 objects; scene seeds from
``seed_offset``, a range no training, tuning or other benchmark uses; each image's noise seed is
its scene seed), at ``steps`` steps and the model's default guidance, for each scheduler
(DDIM, DPM-Solver++, Euler), every method's images are judged against the full-step image of
the same prompt, seed, scheduler and guidance (the reference):

| row | what |
|---|---|
| ``full`` | every step computes: the reference (δ = 0) |
| ``adaptive`` δ | ``budgetdiff.methods.adaptive`` with the paper's estimator ‖Δ³x‖ <= δ‖Δx‖ at each δ of the sweep (the official default δ = 0.01 and the scheduler's tuned δ among them), C_max and warm-up from params |
| ``adaptive_official`` δ | the official code: its scalar estimator, reusing the raw network output (with our per-sample decisions) |
| ``adaptive_rawoutput`` δ | the paper's estimator at the tuned δ, reusing the raw output (v for this model) instead of the scheduler's ``reuse`` space (ε̂ or x̂0): what ``reuse`` adds |
| ``uniform`` | plain sampling with fewer steps: the tuned row's mean NFE, rounded up |
| ``deepcache`` | DeepCache (PyPI ``DeepCache``, ``DeepCacheSDHelper``) on the same UNet |
| ``pab`` | diffusers' Pyramid Attention Broadcast hook on the same UNet's attention layers |

Columns: mean NFE and its speedup, network FLOPs per image (``FlopCounterMode`` around every
UNet call of a one-prompt run, attention counted through the math SDPA kernel; for the
NFE-based methods one evaluation's FLOPs × NFE, sub-batches included), wall-clock seconds and
speedup against ``full`` measured in the same process (all methods of a batch run back to back,
``uniform`` after the loop since its step count needs the tuned row's mean NFE), the pixel,
mid, high and domain metrics of ``budgetdiff.metrics`` against the reference
(``pixel/psnr`` mean, median and pooled, ``pixel/ssim``, LPIPS under its backend's name,
``high/iclip_domainclip``), ``domain/attr_acc`` against the prompt, ``domain/attr_acc_vs_full``
(the attribute checker's reading of the full-step image taken as the spec: the fraction of
those attributes the method's image keeps), and the estimator's overhead (seconds inside the
skip decisions per step / seconds of one full step, %).

δ is tuned for this model, per scheduler, on separate prompts (``tuning.seed_offset``): the
smallest candidate that gives at least ``targets.nfe_speedup`` fewer NFE at mean PSNR >=
``targets.psnr``. Also measured: guidance 7.5 (the SD-1.5 setting of the paper) on a few prompts,
and, on a few prompts at ``oracle.steps`` steps, the estimator's skip paths against the greedy
oracle's (``oracle_skip_path``) at equal NFE. The oracle runs at fewer steps than the rest
because its cost grows as steps² × skips (at 50 steps one prompt would take longer than the
whole benchmark).

Targets (``targets``, pass/fail per scheduler in ``report["targets"]``): the tuned row has at
least 2.0x fewer NFE than full at mean PSNR >= 25 dB; its LPIPS beats DeepCache, PAB and uniform
fewer steps at equal FLOPs (the adaptive δ curve, full run included as δ = 0, is interpolated
linearly at each peer's FLOPs); the estimator's overhead is <= 1 % of a step.

Writes reports/adaptive.json and a quality-vs-NFE plot (PNG).
"""

from __future__ import annotations

import io
import json
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Literal, Optional, Union

import numpy as np
import torch
from tqdm import tqdm

from budgetdiff.methods.adaptive import (
    AdaptiveSkipConfig,
    SkipPlan,
    longest_skip_run,
    max_skips,
    oracle_skip_path,
)
from budgetdiff.domain.evaluators import check_scenes, detect_scenes, scene_attr_acc
from budgetdiff.generation.flops import counting_unet_flops
from budgetdiff.generation.loading import load_pipeline
from budgetdiff.io import atomic_write_bytes, atomic_write_json
from budgetdiff.metrics import MetricScorer, ScoringConfig, psnr
from budgetdiff.domain.scenes import level_prompts
from mlops.cli import command

PAB_HOOK = "pyramid_attention_broadcast"  # diffusers.hooks.pyramid_attention_broadcast's hook name
ATTR_VS_FULL = "domain/attr_acc_vs_full"
Scheduler = Literal["ddim", "dpmpp", "euler"]  # budgetdiff.generation.pipeline.SCHEDULERS
Reuse = Literal["output", "epsilon", "sample"]  # budgetdiff.methods.adaptive.REUSE_SPACES


# ------------------------------------------------------------------------------------------
# Params
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tuning:
    """δ per scheduler, chosen on prompts of its own (``tune_thresholds``)."""

    seed_offset: int
    prompts_per_level: dict[int, int]
    candidates: list[float]


@dataclass(frozen=True)
class DeepCacheSettings:
    cache_interval: int
    cache_branch_id: int


@dataclass(frozen=True)
class PabSettings:
    spatial_attention_block_skip_range: int
    cross_attention_block_skip_range: int
    timestep_skip_range: tuple[int, int]


@dataclass(frozen=True)
class SecondGuidance:
    guidance: float
    scheduler: Scheduler
    prompts_per_level: int


@dataclass(frozen=True)
class Oracle:
    scheduler: Scheduler
    steps: int
    prompts: int
    batch_size: int


@dataclass(frozen=True)
class AdaptiveTargets:
    nfe_speedup: float
    psnr: float
    overhead_pct: float


@dataclass(frozen=True)
class BenchAdaptiveConfig:
    """The ``bench_adaptive`` section of params.yaml."""

    model: str
    clip_dir: str
    attributes_dir: str
    steps: int
    guidance: Optional[float]
    schedulers: list[Scheduler]
    seed_offset: int
    prompts_per_level: dict[int, int]
    batch_size: int
    warmup: int
    max_skip: int
    default_threshold: float
    thresholds: list[float]
    official_thresholds: list[float]
    tuning: Tuning
    deepcache: DeepCacheSettings
    pab: PabSettings
    targets: AdaptiveTargets
    report_path: str
    plot_path: str
    reuse: Union[Reuse, dict[Scheduler, Reuse]] = "epsilon"  # one space for all, or per scheduler (``reuse_for``)
    second_guidance: Optional[SecondGuidance] = None
    oracle: Optional[Oracle] = None


# ------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------
@dataclass
class Method:
    """One row: ``kind`` in full / adaptive / adaptive_official / adaptive_rawoutput / uniform /
    deepcache / pab."""

    name: str
    kind: str
    params: dict = field(default_factory=dict)

    def adaptive_config(self, cfg: BenchAdaptiveConfig, scheduler: str) -> AdaptiveSkipConfig | None:
        if not self.kind.startswith("adaptive"):
            return None
        return AdaptiveSkipConfig(threshold=float(self.params["threshold"]), max_skip=cfg.max_skip,
                                  warmup=cfg.warmup,
                                  estimator="official" if self.kind == "adaptive_official" else "paper",
                                  reuse=self.params.get("reuse", reuse_for(cfg.reuse, scheduler)))


def reuse_for(reuse: str | dict[str, str], scheduler: str) -> str:
    """What a skipped step reuses with ``scheduler``: ``reuse`` is one space for all, or a
    mapping scheduler -> space (unlisted schedulers: "epsilon")."""
    return reuse.get(scheduler, "epsilon") if isinstance(reuse, dict) else reuse


@contextmanager
def deepcache_enabled(pipe, cache_interval: int, cache_branch_id: int):
    """DeepCache on ``pipe.unet``: every ``cache_interval``-th step runs the whole UNet, the
    others only its shallowest skip branch ``cache_branch_id`` and reuse the deeper features."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=int(cache_interval), cache_branch_id=int(cache_branch_id))
    helper.enable()
    try:
        yield
    finally:
        helper.disable()


@contextmanager
def pab_enabled(unet, spatial_attention_block_skip_range: int, cross_attention_block_skip_range: int,
                timestep_skip_range: list[int]):
    """diffusers' Pyramid Attention Broadcast on the UNet's self- (spatial) and cross-attention
    layers; the current timestep comes from a forward pre-hook on the UNet (our pipeline has no
    ``current_timestep`` attribute)."""
    from diffusers.hooks import HookRegistry, PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    current = {"t": None}

    def remember_timestep(module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        current["t"] = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)

    span = tuple(int(v) for v in timestep_skip_range)
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=int(spatial_attention_block_skip_range),
        cross_attention_block_skip_range=int(cross_attention_block_skip_range),
        spatial_attention_timestep_skip_range=span, cross_attention_timestep_skip_range=span,
        current_timestep_callback=lambda: current["t"],
    )
    apply_pyramid_attention_broadcast(unet, config)
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    registry.reset_stateful_hooks()
    handle = unet.register_forward_pre_hook(remember_timestep, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        registry.remove_hook(PAB_HOOK, recurse=True)


@contextmanager
def method_context(pipe, method: Method):
    if method.kind == "deepcache":
        with deepcache_enabled(pipe, **method.params):
            yield
    elif method.kind == "pab":
        with pab_enabled(pipe.unet, **method.params):
            yield
    else:
        yield


def generate(pipe, method: Method, cfg: BenchAdaptiveConfig, prompts, seeds, scheduler: str, guidance: float,
             steps: int):
    """(images (N, 3, H, W) in [0, 1], per-image NFE, skip masks or None, seconds, decision seconds)."""
    n_steps = int(method.params.get("steps", steps))
    with method_context(pipe, method):
        start = time.perf_counter()
        out = pipe(prompts, num_inference_steps=n_steps, guidance_scale=guidance, scheduler=scheduler, seed=seeds,
                   output_type="pt", progress=False, adaptive=method.adaptive_config(cfg, scheduler))
        seconds = time.perf_counter() - start
    records = out.records
    masks = [r["skip_mask"] for r in records] if "skip_mask" in records[0] else None
    decision = sum(r.get("decision_seconds", 0.0) for r in records)
    return out.images.float().cpu(), [r["nfe"] for r in records], masks, seconds, decision


# ------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------
def flops_per_image(pipe, method: Method, cfg: BenchAdaptiveConfig, prompt: str, seed: int, scheduler: str,
                    guidance: float, steps: int) -> float:
    """Network FLOPs of one image of ``method`` (a one-prompt run, every UNet call counted)."""
    with counting_unet_flops(pipe.unet) as calls:
        generate(pipe, method, cfg, [prompt], [seed], scheduler, guidance, steps)
    return float(sum(calls))


# ------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------
def attr_acc_vs_full(checker, images: torch.Tensor, refs: torch.Tensor) -> np.ndarray:
    """Per image: ``domain/attr_acc`` of ``images`` with the checker's reading of the full-step
    image as the spec (1 = the checker sees the same objects, attributes and background)."""
    specs = detect_scenes(checker, refs.to(next(checker.parameters()).device))
    return np.array([scene_attr_acc(c) for c in check_scenes(checker, images, specs)])


def summarize(values: dict[str, np.ndarray], images: torch.Tensor, refs: torch.Tensor) -> dict:
    """Means of the per-image metrics, plus PSNR's median, pooled value and share >= 25 dB."""
    out = {k: float(np.nanmean(v)) for k, v in values.items()}
    p = values["pixel/psnr"]
    mse = float((images - refs).pow(2).mean())
    out.update({"pixel/psnr_median": float(np.median(p)), "pixel/psnr_min": float(np.min(p)),
                "pixel/psnr_pooled": float(10 * np.log10(1.0 / max(mse, 1e-10))),
                "pixel/psnr_share_ge_25": float(np.mean(p >= 25.0))})
    return out


# ------------------------------------------------------------------------------------------
# Tuning δ on separate prompts
# ------------------------------------------------------------------------------------------
def tune_thresholds(pipe, cfg: BenchAdaptiveConfig, guidance: float) -> dict:
    """Per scheduler, the smallest candidate δ (paper estimator) that reaches
    ``targets.nfe_speedup`` fewer NFE at mean PSNR >= ``targets.psnr`` on the tuning prompts.
    Candidates are tried in increasing order and each scheduler's search stops at its first
    pass; when none passes, the candidate with the best speedup among those meeting the PSNR
    target (or the smallest candidate) is taken and ``met`` says False."""
    tcfg, targets, steps = cfg.tuning, cfg.targets, cfg.steps
    prompts, seeds, _ = level_prompts(tcfg.prompts_per_level, tcfg.seed_offset)
    out = {"prompts": len(prompts), "seed_offset": tcfg.seed_offset, "thresholds": {}, "met": {},
           "table": {}, "rule": "per scheduler: the smallest candidate with nfe_speedup >= target and mean PSNR >= "
                                "target on the tuning prompts"}
    for s in tqdm(cfg.schedulers, desc="tuning δ", leave=False):
        ref = generate(pipe, Method("full", "full"), cfg, prompts, seeds, s, guidance, steps)[0]
        table = []
        for delta in sorted(tcfg.candidates):
            images, nfe, *_ = generate(pipe, Method("t", "adaptive", {"threshold": delta}), cfg, prompts, seeds, s,
                                       guidance, steps)
            row = {"threshold": delta, "mean_nfe": float(np.mean(nfe)), "nfe_speedup": steps / float(np.mean(nfe)),
                   "psnr": float(psnr(images, ref).mean())}
            row["passes"] = row["nfe_speedup"] >= targets.nfe_speedup and row["psnr"] >= targets.psnr
            table.append(row)
            if row["passes"]:
                break
        good = [r for r in table if r["passes"]] or [r for r in table if r["psnr"] >= targets.psnr] or table[:1]
        best = good[0] if good[0]["passes"] else max(good, key=lambda r: r["nfe_speedup"])
        out["thresholds"][s], out["met"][s], out["table"][s] = best["threshold"], best["passes"], table
    return out


# ------------------------------------------------------------------------------------------
# One scheduler
# ------------------------------------------------------------------------------------------
def benchmark_scheduler(pipe, cfg: BenchAdaptiveConfig, scorer: MetricScorer, checker, scheduler: str,
                        guidance: float, prompts, seeds, levels, tuned: float) -> tuple[dict, torch.Tensor]:
    """Every method's rows for one scheduler, and the full-step images (the references)."""
    steps, bs = cfg.steps, cfg.batch_size
    thresholds = sorted(set(cfg.thresholds) | {tuned})
    methods = [Method("full", "full")]
    methods += [Method(f"adaptive δ={d:g}", "adaptive", {"threshold": d}) for d in thresholds]
    methods += [Method(f"adaptive_official δ={d:g}", "adaptive_official", {"threshold": d, "reuse": "output"})
                for d in cfg.official_thresholds]
    if reuse_for(cfg.reuse, scheduler) != "output":
        methods.append(Method(f"adaptive_rawoutput δ={tuned:g}", "adaptive_rawoutput",
                              {"threshold": tuned, "reuse": "output"}))
    methods += [Method(f"deepcache N={cfg.deepcache.cache_interval}", "deepcache", asdict(cfg.deepcache)),
                Method("pab", "pab", asdict(cfg.pab))]
    runs = {m.name: {"images": [], "nfe": [], "masks": [], "seconds": 0.0, "decision": 0.0} for m in methods}

    def record(method: Method, chunk_prompts, chunk_seeds):
        images, nfe, masks, seconds, decision = generate(pipe, method, cfg, chunk_prompts, chunk_seeds, scheduler,
                                                         guidance, steps)
        r = runs[method.name]
        r["images"].append(images)
        r["nfe"] += nfe
        r["masks"] += masks or []
        r["seconds"] += seconds
        r["decision"] += decision

    batches = [(prompts[i : i + bs], seeds[i : i + bs]) for i in range(0, len(prompts), bs)]
    with tqdm(total=len(batches) * len(methods), desc=f"{scheduler}", unit="run", leave=False) as bar:
        for chunk_prompts, chunk_seeds in batches:  # all methods of a batch back to back: same load
            for method in methods:
                bar.set_postfix_str(method.name)
                record(method, chunk_prompts, chunk_seeds)
                bar.update()
    tuned_name = f"adaptive δ={tuned:g}"
    # rounded up: the uniform row gets at least the tuned row's FLOPs (a comparison in its favour)
    uniform_steps = max(1, int(np.ceil(float(np.mean(runs[tuned_name]["nfe"])) - 1e-9)))
    uniform = Method(f"uniform {uniform_steps} steps", "uniform", {"steps": uniform_steps})
    runs[uniform.name] = {"images": [], "nfe": [], "masks": [], "seconds": 0.0, "decision": 0.0}
    for chunk_prompts, chunk_seeds in tqdm(batches, desc=f"{scheduler}: {uniform.name}", leave=False):
        record(uniform, chunk_prompts, chunk_seeds)
    methods.append(uniform)

    # FLOPs: one evaluation (a CFG pair of one image) × NFE; measured whole runs for the rest.
    one_eval = flops_per_image(pipe, Method("full", "full"), cfg, prompts[0], seeds[0], scheduler, guidance, 1)
    full = runs["full"]
    refs = torch.cat(full["images"])
    full_step_seconds = full["seconds"] / (steps * len(batches))
    rows = []
    for method in tqdm(methods, desc=f"{scheduler}: scoring", leave=False):
        r = runs[method.name]
        images = torch.cat(r["images"])
        mean_nfe = float(np.mean(r["nfe"]))
        if method.kind in ("deepcache", "pab"):
            flops = flops_per_image(pipe, method, cfg, prompts[0], seeds[0], scheduler, guidance, steps)
        else:
            flops = one_eval * mean_nfe
        values = scorer.score(images, refs=refs, prompts=prompts)
        values[ATTR_VS_FULL] = attr_acc_vs_full(checker, images, refs)
        row = {"method": method.name, "kind": method.kind, "params": method.params,
               "mean_nfe": mean_nfe, "nfe_speedup": steps / mean_nfe,
               "flops_per_image": flops, "flops_speedup": one_eval * steps / flops,
               "seconds_per_image": r["seconds"] / len(prompts), "wall_speedup": full["seconds"] / r["seconds"],
               **summarize(values, images, refs)}
        if method.kind.startswith("adaptive"):
            row["mean_nfe_by_objects"] = {str(k): float(np.mean([n for n, lv in zip(r["nfe"], levels) if lv == k]))
                                          for k in sorted(set(levels))}
            row["estimator_overhead_pct"] = 100 * (r["decision"] / (steps * len(batches))) / full_step_seconds
            row["skip_rate_by_step"] = np.mean(np.array(r["masks"], dtype=float), axis=0).round(3).tolist()
        rows.append(row)
    result = {"rows": rows, "flops_per_evaluation": one_eval, "uniform_steps": uniform_steps,
              "tuned_row": tuned_name, "full_step_seconds_per_batch": full_step_seconds, "batches": len(batches)}
    return result, refs


def equal_flops_comparison(rows: list[dict], lpips_name: str) -> dict:
    """Each peer's LPIPS against the adaptive (paper estimator) curve's LPIPS at the peer's FLOPs,
    interpolated linearly between the δ sweep's points (the full run is the δ = 0 point). A peer
    below the curve's lowest FLOPs is not comparable (``adaptive_lpips`` None)."""
    curve = sorted(((r["flops_per_image"], r[lpips_name]) for r in rows if r["kind"] in ("full", "adaptive")))
    xs, ys = np.array([c[0] for c in curve]), np.array([c[1] for c in curve])
    out = {}
    for r in rows:
        if r["kind"] not in ("uniform", "deepcache", "pab", "adaptive_official", "adaptive_rawoutput"):
            continue
        f = r["flops_per_image"]
        adaptive = float(np.interp(f, xs, ys)) if xs.min() <= f <= xs.max() * (1 + 1e-9) else None
        out[r["method"]] = {"flops_per_image": f, "lpips": r[lpips_name], "adaptive_lpips_at_equal_flops": adaptive,
                            "adaptive_better": None if adaptive is None else adaptive < r[lpips_name]}
    return out


# ------------------------------------------------------------------------------------------
# Guidance 7.5 and the oracle
# ------------------------------------------------------------------------------------------
def second_guidance(pipe, cfg: BenchAdaptiveConfig, scorer: MetricScorer, checker, tuned: float,
                    default_images: torch.Tensor, prompts, seeds) -> dict:
    """Full and adaptive (default and the scheduler's tuned δ) at guidance ``second_guidance.guidance`` on the
    first prompts of each level; the full images' attr_acc against the prompt is compared with
    the default guidance's on the same prompts (does the model tolerate it?)."""
    g = cfg.second_guidance
    steps, scheduler, guidance = cfg.steps, g.scheduler, g.guidance
    rows, full_images = [], None
    methods = [Method("full", "full"), Method(f"adaptive δ={cfg.default_threshold:g}", "adaptive",
                                              {"threshold": cfg.default_threshold})]
    if tuned != cfg.default_threshold:
        methods.append(Method(f"adaptive δ={tuned:g}", "adaptive", {"threshold": tuned}))
    for method in tqdm(methods, desc=f"guidance {guidance}", leave=False):
        images, nfe, _, seconds, _ = generate(pipe, method, cfg, prompts, seeds, scheduler, guidance, steps)
        if full_images is None:
            full_images = images
        values = scorer.score(images, refs=full_images, prompts=prompts)
        rows.append({"method": method.name, "mean_nfe": float(np.mean(nfe)), "nfe_speedup": steps / float(np.mean(nfe)),
                     **summarize(values, images, full_images)})
    default_acc = float(np.nanmean(scorer.score(default_images, prompts=prompts)["domain/attr_acc"]))
    return {"guidance": guidance, "scheduler": scheduler, "prompts": len(prompts), "rows": rows,
            "attr_acc_vs_prompt_full": {"default_guidance": default_acc, str(guidance): rows[0]["domain/attr_acc"]}}


def random_admissible_mask(steps: int, skips: int, warmup: int, max_skip: int, rng: random.Random,
                           tries: int = 10_000) -> list[bool] | None:
    """A uniformly random skip mask with ``skips`` skips after the warm-up and no run longer
    than ``max_skip`` (rejection sampling; None when no sample is accepted)."""
    free = list(range(warmup, steps))
    for _ in range(tries):
        chosen = set(rng.sample(free, skips))
        mask = [k in chosen for k in range(steps)]
        if longest_skip_run(mask) <= max_skip:
            return mask
    return None


def oracle_comparison(pipe, cfg: BenchAdaptiveConfig, guidance: float, tuned: float, prompts, seeds, levels) -> dict:
    """Estimator path (tuned δ) against the greedy oracle path at the estimator's NFE, per prompt:
    overlap of the skipped steps (|both| / |oracle's|; a random admissible path's expected
    overlap beside it) and each path's final-image PSNR against the full-step image."""
    ocfg = cfg.oracle
    steps, scheduler = ocfg.steps, ocfg.scheduler
    warmup, max_skip = cfg.warmup, cfg.max_skip
    reuse = reuse_for(cfg.reuse, scheduler)
    config = AdaptiveSkipConfig(threshold=tuned, max_skip=max_skip, warmup=warmup, reuse=reuse)
    # one prompt per level, round robin, so the few prompts span the complexity levels
    by_level: dict[int, list[int]] = {}
    for i, lv in enumerate(levels):
        by_level.setdefault(lv, []).append(i)
    order = [idx for group in zip(*by_level.values()) for idx in group][: ocfg.prompts]
    rng = random.Random(0)
    out = []
    for i in tqdm(order, desc="oracle", leave=False):
        est = pipe(prompts[i], num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler, seed=seeds[i],
                   output_type="pt", progress=False, adaptive=config)
        mask, nfe = est.records[0]["skip_mask"], est.records[0]["nfe"]
        oracle = oracle_skip_path(pipe, prompts[i], seeds[i], steps, nfe, scheduler=scheduler, guidance_scale=guidance,
                                  warmup=warmup, max_skip=max_skip, batch_size=ocfg.batch_size, progress=True,
                                  reuse=reuse)
        skips = sum(mask)
        est_set, orc_set = {k for k, s in enumerate(mask) if s}, {k for k, s in enumerate(oracle.mask) if s}
        randoms = [m for m in (random_admissible_mask(steps, skips, warmup, max_skip, rng) for _ in range(200)) if m]
        random_overlap = (float(np.mean([len({k for k, s in enumerate(m) if s} & orc_set) / skips for m in randoms]))
                          if skips and randoms else None)
        random_psnr = None
        if skips and randoms:
            image = pipe(prompts[i], num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler,
                         seed=seeds[i], output_type="pt", progress=False, adaptive=SkipPlan(randoms[0], reuse=reuse)).images
            random_psnr = float(psnr(image.float(), oracle.reference.float()))
        out.append({
            "prompt": prompts[i], "objects": levels[i], "nfe": nfe, "skips": skips,
            "estimator_mask": mask, "oracle_mask": oracle.mask, "oracle_order": oracle.order,
            "overlap": len(est_set & orc_set) / skips if skips else None,
            "random_path_expected_overlap": random_overlap,
            "psnr_estimator": float(psnr(est.images.float(), oracle.reference.float())),
            "psnr_oracle": float(psnr(oracle.image.float(), oracle.reference.float())),
            "psnr_random_path": random_psnr,
        })
    overlaps = [p["overlap"] for p in out if p["overlap"] is not None]
    randoms = [p["random_path_expected_overlap"] for p in out if p["random_path_expected_overlap"] is not None]
    return {"scheduler": scheduler, "steps": steps, "threshold": tuned, "loss": "mse (pixel, = PSNR)",
            "max_skips_allowed": max_skips(steps, warmup, max_skip), "prompts": out,
            "mean_overlap": float(np.mean(overlaps)) if overlaps else None,
            "mean_random_expected_overlap": float(np.mean(randoms)) if randoms else None}


# ------------------------------------------------------------------------------------------
# Targets, plot, stage
# ------------------------------------------------------------------------------------------
def check_targets(report: dict, t: AdaptiveTargets) -> dict:
    lpips_name = report["lpips_backend"]
    out = {}
    for s, res in report["schedulers"].items():
        tuned = next(r for r in res["rows"] if r["method"] == res["tuned_row"])
        peers = res["equal_flops"]
        out[s] = {
            "nfe_speedup_at_psnr": {"row": tuned["method"], "nfe_speedup": tuned["nfe_speedup"],
                                    "psnr": tuned["pixel/psnr"], "target": f">= {t.nfe_speedup}x at >= {t.psnr} dB",
                                    "met": tuned["nfe_speedup"] >= t.nfe_speedup and tuned["pixel/psnr"] >= t.psnr},
            "lpips_better_than_peers_at_equal_flops": {
                name: v["adaptive_better"] for name, v in peers.items() if not name.startswith("adaptive_")},
            "estimator_overhead_pct": {
                "max": max(r["estimator_overhead_pct"] for r in res["rows"] if "estimator_overhead_pct" in r),
                "target": f"<= {t.overhead_pct}"},
        }
        out[s]["estimator_overhead_pct"]["met"] = out[s]["estimator_overhead_pct"]["max"] <= t.overhead_pct
        out[s]["lpips_met"] = all(v is True for v in out[s]["lpips_better_than_peers_at_equal_flops"].values())
        out[s]["lpips_name"] = lpips_name
    return out


def quality_plot(report: dict) -> bytes:
    """PSNR and LPIPS against NFE-equivalents (FLOPs / one evaluation), one column per scheduler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lpips_name = report["lpips_backend"]
    scheds = list(report["schedulers"])
    fig, axes = plt.subplots(2, len(scheds), figsize=(4.2 * len(scheds), 7), squeeze=False)
    styles = {"adaptive": ("o-", "C0", "adaptive (paper ‖Δ³x‖ ≤ δ‖Δx‖)"),
              "adaptive_official": ("s", "C1", "adaptive (official: scalar, raw output)"),
              "adaptive_rawoutput": ("P", "C5", "adaptive, raw-output reuse"), "uniform": ("^", "C2", "uniform fewer steps"),
              "deepcache": ("D", "C3", "DeepCache"), "pab": ("v", "C4", "PAB"), "full": ("*", "k", "full")}
    for j, s in enumerate(scheds):
        res = report["schedulers"][s]
        for i, (metric, label) in enumerate((("pixel/psnr", "PSNR vs full (dB)"), (lpips_name, lpips_name))):
            ax = axes[i][j]
            for kind, (fmt, color, name) in styles.items():
                rows = sorted((r for r in res["rows"] if r["kind"] == kind), key=lambda r: r["flops_per_image"])
                if kind == "full" and metric == "pixel/psnr":
                    continue  # identical to itself: capped at 100 dB
                if not rows:
                    continue
                x = [r["flops_per_image"] / res["flops_per_evaluation"] for r in rows]
                ax.plot(x, [r[metric] for r in rows], fmt, color=color, label=name)
                if kind == "adaptive":
                    for r, xv in zip(rows, x):
                        ax.annotate(f"δ={r['params']['threshold']:g}", (xv, r[metric]), fontsize=7,
                                    textcoords="offset points", xytext=(3, 3))
            if metric == "pixel/psnr":
                ax.axhline(report["targets_config"]["psnr"], color="gray", lw=0.8, ls="--")
                ax.set_title(f"{s}, {report['steps']} steps, guidance {report['guidance']:g}")
            else:
                ax.set_yscale("symlog", linthresh=1e-5)  # values span decades; the full run's is 0
            ax.set_xlabel("NFE-equivalent (network FLOPs / one evaluation)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def run(cfg: BenchAdaptiveConfig) -> dict:
    """The whole benchmark; returns the report (see the module docstring)."""
    torch.manual_seed(0)
    start = time.time()
    pipe = load_pipeline(cfg.model)
    pipe.set_progress_bar_config(disable=True)
    scorer = MetricScorer(ScoringConfig(clip_dir=cfg.clip_dir, attributes_dir=cfg.attributes_dir))
    checker = scorer.checker
    guidance = float(pipe.config.default_guidance_scale if cfg.guidance is None else cfg.guidance)
    steps = cfg.steps
    report: dict = {"model": cfg.model, "steps": steps, "guidance": guidance, "torch_threads": torch.get_num_threads(),
                    "reuse": {s: reuse_for(cfg.reuse, s) for s in cfg.schedulers},
                    "max_skip": cfg.max_skip, "warmup": cfg.warmup,
                    "official_default": {"threshold": AdaptiveSkipConfig().threshold,
                                         "max_skip": AdaptiveSkipConfig().max_skip},
                    "versions": {k: metadata.version(k) for k in ("diffusers", "DeepCache", "torch")},
                    "lpips_backend": scorer.lpips.name, "targets_config": asdict(cfg.targets),
                    "definitions": {
                        ATTR_VS_FULL: "attr_acc of the image with the attribute checker's reading of the full-step "
                                      "image as the spec (agreement with the reference)",
                        "domain/attr_acc": "attr_acc against the prompt (absolute faithfulness)",
                        "pixel/psnr": "mean per-image PSNR against the full-step image (capped at 100 dB)",
                        "pixel/psnr_pooled": "10·log10(1 / MSE over all images)",
                        "estimator_overhead_pct": "seconds in the skip decisions per step / seconds of one full step",
                        "wall_speedup": "full run's seconds / method's seconds, same process, same batches",
                        "flops_per_image": "network FLOPs per image (CFG pair counted), FlopCounterMode"}}

    t0 = time.time()
    report["tuning"] = tune_thresholds(pipe, cfg, guidance)
    report["tuning"]["seconds"] = round(time.time() - t0, 1)
    tuned_by_scheduler = report["tuning"]["thresholds"]
    report["tuned_thresholds"] = tuned_by_scheduler

    prompts, seeds, levels = level_prompts(cfg.prompts_per_level, cfg.seed_offset)
    report["prompts"] = {"count": len(prompts), "per_level": {str(k): levels.count(k) for k in sorted(set(levels))},
                         "seed_offset": cfg.seed_offset, "batch_size": cfg.batch_size}
    report["schedulers"] = {}
    full_images = {}
    for s in cfg.schedulers:
        t0 = time.time()
        tuned = tuned_by_scheduler[s]
        res, full_images[s] = benchmark_scheduler(pipe, cfg, scorer, checker, s, guidance, prompts, seeds, levels,
                                                  tuned)
        res["equal_flops"] = equal_flops_comparison(res["rows"], report["lpips_backend"])
        res["seconds"] = round(time.time() - t0, 1)
        report["schedulers"][s] = res
        tuned_row = next(r for r in res["rows"] if r["method"] == res["tuned_row"])
        print(f"[{s}] tuned δ={tuned:g}: NFE {tuned_row['mean_nfe']:.1f} ({tuned_row['nfe_speedup']:.2f}x), "
              f"PSNR {tuned_row['pixel/psnr']:.2f} dB, LPIPS {tuned_row[report['lpips_backend']]:.3f}, "
              f"wall {tuned_row['wall_speedup']:.2f}x ({res['seconds']:.0f} s)", flush=True)

    g = cfg.second_guidance
    if g:
        sub = [i for k in sorted(set(levels))
               for i in [j for j, lv in enumerate(levels) if lv == k][: g.prompts_per_level]]
        if g.scheduler in full_images:  # the same prompts and seeds at the default guidance
            default_images = full_images[g.scheduler][sub]
        else:
            default_images = pipe([prompts[i] for i in sub], num_inference_steps=steps, guidance_scale=guidance,
                                  scheduler=g.scheduler, seed=[seeds[i] for i in sub], output_type="pt",
                                  progress=False).images.float()
        t0 = time.time()
        report["second_guidance"] = second_guidance(pipe, cfg, scorer, checker, tuned_by_scheduler[g.scheduler],
                                                    default_images,
                                                    [prompts[i] for i in sub], [seeds[i] for i in sub])
        report["second_guidance"]["seconds"] = round(time.time() - t0, 1)
    if cfg.oracle:
        t0 = time.time()
        report["oracle"] = oracle_comparison(pipe, cfg, guidance, tuned_by_scheduler[cfg.oracle.scheduler],
                                             prompts, seeds, levels)
        report["oracle"]["seconds"] = round(time.time() - t0, 1)
    report["deepcache"] = {
        "package": "DeepCache (PyPI), DeepCacheSDHelper",
        "works_on_this_unet": True,
        "note": "DeepCacheSDHelper wraps a diffusers UNet2DConditionModel's blocks by name; our model is one, so "
                "it runs unchanged (cache_branch_id 0: on cached steps only conv_in, the shallowest up-block "
                "resnet and conv_out run)."}
    report["targets"] = check_targets(report, cfg.targets)
    report["seconds_total"] = round(time.time() - start, 1)
    return report


@command
def main() -> None:
    from mlops.params import load_config
    from mlops.tracking import EXPERIMENT, run_tags, tracking_uri

    cfg = load_config("bench_adaptive", BenchAdaptiveConfig)
    report = run(cfg)
    atomic_write_json(cfg.report_path, report)
    atomic_write_bytes(cfg.plot_path, quality_plot(report))
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="bench_adaptive", tags=run_tags("bench_adaptive")):
        mlflow.log_params({f"tuned_threshold_{s}": d for s, d in report["tuned_thresholds"].items()})
        for s, res in report["schedulers"].items():
            row = next(r for r in res["rows"] if r["method"] == res["tuned_row"])
            mlflow.log_metrics({f"bench_adaptive/{s}_{k.replace('/', '_')}": v for k, v in row.items()
                                if isinstance(v, float)})
        mlflow.log_artifact(cfg.report_path)
        mlflow.log_artifact(cfg.plot_path)
    summary = {s: {"nfe": t["nfe_speedup_at_psnr"]["met"], "lpips": t["lpips_met"],
                   "overhead": t["estimator_overhead_pct"]["met"]} for s, t in report["targets"].items()}
    print(json.dumps({"tuned_thresholds": report["tuned_thresholds"], "targets_met": summary,
                      "seconds_total": report["seconds_total"]}))


if __name__ == "__main__":
    main()
