"""DVC stage ``calibrate_auto``: measure the plans ``auto`` may choose between, on calibration
prompts of their own, and write the auto policy the bundle ships (``models/auto_policy``).

``auto`` has to answer two questions per request: with no ``quality_target``, which plan is the
cheapest that keeps the prompt-level quality (attr_acc, CLIP-T) of the full-step model; with a
``quality_target`` q, which plan is the cheapest that delivers realised quality >= q for (at
least) ``coverage`` of the requests. Both are answered from measurements, not from the budget
predictor's own curves (which are means, so choosing by them meets a target for about half the
images).

The candidates (params ``calibrate_auto.candidates``):

- ``uniform``: the base model at S steps, or the student at its steps and a guidance;
- ``budget``: BudgetFusion's per-prompt step count from the predictor, with a quality-target rule
  (fewest steps whose predicted quality reaches q' on every level) or the plateau rule at ε.

Every candidate renders the same calibration prompts and seeds (``seed_offset``: a range no other
stage uses) and is scored against the base model's full-step image of the same seed (realised
quality: the lowest of SSIM, 1 - LPIPS and I-CLIP, as ``quality_target`` is defined) and against
the prompt (CLIP-T, attr_acc). The policy stores, per candidate, its mean UNet GFLOPs per image,
its paired attr_acc / CLIP-T difference to the full-step images with standard errors, and
split-conformal lower bounds of realised quality: for coverage c, the ceil((n + 1) c)-th largest of
the n calibration values, so that a new exchangeable request reaches it with probability >= c.

Writes models/auto_policy/auto_policy.json (``budgetdiff-auto-policy/1``), reports/calibrate_auto.json
and reports/calibrate_auto.png. Finished candidates are cached under ``cache_dir``: an interrupted
run resumes.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from budgetdiff.generation.engine import GenerationRequest, Generator
from budgetdiff.io.fingerprint import content_sha256
from budgetdiff.io import atomic_write_bytes, atomic_write_json
from budgetdiff.domain.scenes import held_out_scenes
from budgetdiff.methods.auto_policy import AutoCandidate, AutoPolicy
from budgetdiff.statistics.quality import conformal_lower_bound, mean_quality, realised_quality
from mlops.cli import fail
from mlops.params import ParamsError, config_dict, load_config
from pipelines.bundle import BundleConfig, SkipPolicySource, skip_policy_for

ATTR, CLIPT = "domain/attr_acc", "high/clipt_domainclip"


@dataclass(frozen=True)
class CandidatesConfig:
    """params.yaml ``calibrate_auto.candidates``: the plans measured (a kind left out: none)."""

    base_steps: list[int] = field(default_factory=list)
    base_steps_skip: list[int] = field(default_factory=list)
    student_guidance: list[float] = field(default_factory=list)
    budget_quality: list[float] = field(default_factory=list)
    budget_plateau: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class TolerancesConfig:
    """params.yaml ``calibrate_auto.tolerances``: allowed drops vs the full-step images."""

    attr_acc: float
    clipt: float


@dataclass(frozen=True, kw_only=True)
class CalibrateAutoConfig:
    """params.yaml ``calibrate_auto``."""

    base: str
    student: str
    student_steps: int
    budget: str
    clip_dir: str
    attributes_dir: str
    scheduler: str
    reference_steps: int
    prompts: int
    seed_offset: int
    count_weights: list[float]
    batch_size: int
    torch_threads: Optional[int] = None
    candidates: CandidatesConfig
    # None: params.yaml ``bundle.skip_policy`` (load_stage_config fills it in: one source)
    skip_policy: Optional[SkipPolicySource] = None
    tolerances: TolerancesConfig
    se_margin: float
    coverage: float
    coverages: list[float]
    cache_dir: str
    output_dir: str
    report_path: str
    plot_path: str


class CalibrateAutoError(ValueError):
    """A params value the stage cannot run with."""


def candidates_from_params(c: CandidatesConfig, student_steps: int) -> list[AutoCandidate]:
    """The candidate plans of ``calibrate_auto.candidates`` (the student at ``student_steps``)."""
    out = []
    for s in c.base_steps:
        out.append(AutoCandidate(f"base@{s}", "uniform", "base", steps=s))
    for st in c.base_steps_skip:
        out.append(AutoCandidate(f"base@{st}+skip", "uniform", "base", steps=st, skip=True))
    for g in c.student_guidance:
        out.append(AutoCandidate(f"student@{student_steps},w{g:g}", "uniform", "student",
                                 steps=student_steps, guidance=g))
    for q in c.budget_quality:
        out.append(AutoCandidate(f"budget q'{q:g}", "budget", "base", budget_quality=q))
    for eps in c.budget_plateau:
        out.append(AutoCandidate(f"budget eps{eps:g}", "budget", "base", budget_epsilon=eps))
    names = [x.name for x in out]
    if len(set(names)) != len(names):
        raise CalibrateAutoError(f"calibrate_auto.candidates: duplicate candidates {names}")
    if not out:
        raise CalibrateAutoError("calibrate_auto.candidates: no candidate to measure")
    return out


def build_generator(cfg: CalibrateAutoConfig) -> Generator:
    """The engine on the models themselves (not models/bundle, which this stage's output feeds);
    the skip candidates use the skip policy the bundle will ship, built the way the bundle stage
    builds it (``pipelines.bundle.skip_policy_for`` on params ``bundle.skip_policy``)."""
    from budgetdiff.methods.budget import load_budget_predictor
    from budgetdiff.generation.loading import load_pipeline

    base = load_pipeline(cfg.base)
    student = load_pipeline(cfg.student)
    predictor = load_budget_predictor(cfg.budget)
    predictor.check_model(cfg.base)
    policy = skip_policy_for(cfg.skip_policy) if cfg.skip_policy else None
    return Generator(base, student, student_steps=cfg.student_steps, predictor=predictor,
                     skip_policy=policy, model_paths={"base": cfg.base, "student": cfg.student})


def requests_for(cand: AutoCandidate, prompts: list[str], seeds: list[int]) -> list[GenerationRequest]:
    if cand.kind == "uniform" and cand.skip:  # the skip policy's default point, as auto will run it
        return [GenerationRequest(p, mode="adaptive", steps=cand.steps, seed=s) for p, s in zip(prompts, seeds)]
    if cand.kind == "uniform" and cand.model == "base":
        return [GenerationRequest(p, mode="full", steps=cand.steps, seed=s) for p, s in zip(prompts, seeds)]
    if cand.kind == "uniform":
        return [GenerationRequest(p, mode="student", guidance=cand.guidance, seed=s) for p, s in zip(prompts, seeds)]
    if cand.budget_quality is not None:
        return [GenerationRequest(p, mode="budget", quality_target=cand.budget_quality, seed=s)
                for p, s in zip(prompts, seeds)]
    return [GenerationRequest(p, mode="budget", seed=s) for p, s in zip(prompts, seeds)]


def render(gen: Generator, cand: AutoCandidate, prompts, seeds, batch_size: int, cache: Path, key: str) -> dict:
    path = cache / f"{cand.name.replace(' ', '_').replace(',', '_')}_{key}.pt"
    if path.is_file():
        print(f"[{cand.name}] resumed from {path}", flush=True)
        return torch.load(path, weights_only=False)
    reqs = requests_for(cand, prompts, seeds)
    previous_eps = gen.plateau_epsilon
    if cand.budget_epsilon is not None:
        gen.plateau_epsilon = cand.budget_epsilon
    bar = tqdm(total=len(reqs), desc=cand.name, unit="image", leave=False)
    start = time.perf_counter()
    try:
        results = gen(reqs, output_type="pt", batch_size=batch_size, progress=bar.update)
    finally:
        gen.plateau_epsilon = previous_eps
        bar.close()
    out = {"images": torch.stack([r.image.cpu() for r in results]),
           "steps": [r.record.steps for r in results], "nfe": [r.record.nfe for r in results],
           "gflops": [r.record.unet_gflops for r in results], "seconds": time.perf_counter() - start}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(out, tmp)
    tmp.replace(path)
    print(f"[{cand.name}] {len(reqs)} images in {out['seconds']:.1f}s, mean steps {np.mean(out['steps']):.2f}",
          flush=True)
    return out


def paired(diff: np.ndarray) -> dict:
    d = diff[np.isfinite(diff)]
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "n": int(len(d))}


def measure(cand: AutoCandidate, out: dict, values: dict, ref_values: dict, coverages: list[float]) -> AutoCandidate:
    quality = realised_quality(values)
    measured = {
        "gflops_per_image": float(np.mean(out["gflops"])), "mean_nfe": float(np.mean(out["nfe"])),
        "mean_steps": float(np.mean(out["steps"])),
        "steps_histogram": {str(k): int(v) for k, v in zip(*np.unique(out["steps"], return_counts=True))},
        "attr_acc": float(np.nanmean(values[ATTR])), "clipt": float(np.mean(values[CLIPT])),
        "attr_acc_vs_full": paired(values[ATTR] - ref_values[ATTR]),
        "clipt_vs_full": paired(values[CLIPT] - ref_values[CLIPT]),
        "quality_mean": mean_quality(quality),
        "quality_quantiles": {f"{q:g}": float(np.quantile(quality, q)) for q in (0.01, 0.05, 0.1, 0.25, 0.5)},
        "quality_lower_bound": {f"{c:g}": float(conformal_lower_bound(quality, c)) for c in coverages},
        "n": int(len(quality)),
    }
    return AutoCandidate(cand.name, cand.kind, cand.model, cand.steps, cand.guidance, cand.budget_quality,
                         cand.budget_epsilon, measured, cand.skip)


def select_default(cands: list[AutoCandidate], tolerances: TolerancesConfig, se_margin: float) -> tuple[str, str]:
    """The cheapest candidate whose paired attr_acc and CLIP-T differences to the full-step images,
    less ``se_margin`` standard errors, stay within the tolerances."""
    ok = []
    for c in cands:
        m = c.measured
        a, t = m["attr_acc_vs_full"], m["clipt_vs_full"]
        if a["mean"] - se_margin * a["se"] >= -tolerances.attr_acc and \
                t["mean"] - se_margin * t["se"] >= -tolerances.clipt:
            ok.append(c)
    if not ok:
        raise CalibrateAutoError("calibrate_auto: no candidate keeps attr_acc and CLIP-T within the tolerances; "
                                 "add more expensive candidates")
    best = min(ok, key=lambda c: c.measured["gflops_per_image"])
    why = (f"fewest UNet GFLOPs among {len(ok)} of {len(cands)} candidates whose attr_acc and CLIP-T, less "
           f"{se_margin:g} standard errors, stay within {tolerances.attr_acc} / {tolerances.clipt} of the "
           "full-step images")
    return best.name, why


def plot(policy: AutoPolicy, full_gflops: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    cov = f"{policy.coverage:g}"
    for ax, key, label in ((axes[0], "lower", f"realised quality reached by {policy.coverage:.0%} (conformal bound)"),
                           (axes[1], "attr", "attr_acc vs full-step (paired mean ± 1 se)")):
        for c in policy.candidates:
            m = c.measured
            x = full_gflops / m["gflops_per_image"]
            color = {"base": "tab:blue", "student": "tab:orange"}[c.model] if c.kind == "uniform" else "tab:green"
            if key == "lower":
                ax.scatter(x, m["quality_lower_bound"][cov], color=color, s=30)
                ax.scatter(x, m["quality_mean"], color=color, s=12, marker="x")
            else:
                a = m["attr_acc_vs_full"]
                ax.errorbar(x, a["mean"], yerr=a["se"], fmt="o", color=color, ms=4)
            ax.annotate(c.name, (x, m["quality_lower_bound"][cov] if key == "lower" else m["attr_acc_vs_full"]["mean"]),
                        fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("UNet GFLOPs reduction vs full-step base (x)")
        ax.set_ylabel(label)
    axes[1].axhline(-policy.tolerances["attr_acc"], color="red", ls=":", lw=1, label="tolerance")
    axes[1].legend(fontsize=8)
    axes[0].set_title(f"auto candidates: lower bound (dots) and mean (x) of realised quality; "
                      f"blue base, orange student, green budget", fontsize=8)
    axes[1].set_title(f"default: {policy.default}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def cache_key(model_key: list[str], name: str, prompts: list[str], seeds: list[int], batch_size: int) -> str:
    """The key of a candidate's cached renders: the models, the candidate, the prompts and seeds,
    the batch size (a batch's images depend on it). Kept stable: a rerun resumes from the cache."""
    return content_sha256([model_key, name, prompts, seeds, batch_size])


def run(cfg: CalibrateAutoConfig) -> tuple[AutoPolicy, dict]:
    from budgetdiff.metrics import MetricScorer, ScoringConfig
    from budgetdiff.metrics.semantic import load_clip_backbone
    from budgetdiff.domain.evaluators import load_attribute_checker
    from budgetdiff.io.fingerprint import directory_fingerprint, unet_fingerprint

    torch.manual_seed(0)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    coverages = cfg.coverages
    if not 0 < cfg.coverage < 1 or cfg.coverage not in coverages:
        raise CalibrateAutoError(f"calibrate_auto.coverage: must be in (0, 1) and one of coverages {coverages}")
    gen = build_generator(cfg)
    cands = candidates_from_params(cfg.candidates, gen.student_steps)
    scorer = MetricScorer(ScoringConfig(batch_size=256), clip=load_clip_backbone(cfg.clip_dir),
                          checker=load_attribute_checker(cfg.attributes_dir))
    specs, prompts = held_out_scenes(cfg.prompts, cfg.seed_offset, count_weights=cfg.count_weights)
    seeds = [cfg.seed_offset + i for i in range(len(prompts))]
    model_key = [unet_fingerprint(p) for p in (cfg.base, cfg.student)] + [directory_fingerprint(cfg.budget)]
    cache = Path(cfg.cache_dir)

    def key(name: str) -> str:
        return cache_key(model_key, name, prompts, seeds, cfg.batch_size)

    start = time.time()
    ref_cand = AutoCandidate(f"base@{cfg.reference_steps}", "uniform", "base", steps=cfg.reference_steps)
    ref = render(gen, ref_cand, prompts, seeds, cfg.batch_size, cache, key(ref_cand.name))
    ref_values = scorer.score(ref["images"], refs=ref["images"], prompts=prompts)
    measured = []
    for cand in cands:
        out = render(gen, cand, prompts, seeds, cfg.batch_size, cache, key(cand.name))
        values = scorer.score(out["images"], refs=ref["images"], prompts=prompts)
        m = measure(cand, out, values, ref_values, coverages)
        measured.append(m)
        mm = m.measured
        lower = mm["quality_lower_bound"][f"{cfg.coverage:g}"]
        print(f"[{m.name}] GFLOPs {mm['gflops_per_image']:.2f} quality mean {mm['quality_mean']:.4f} "
              f"lower@{cfg.coverage} {lower:.4f} "
              f"attr {mm['attr_acc_vs_full']['mean']:+.4f}±{mm['attr_acc_vs_full']['se']:.4f} "
              f"clipt {mm['clipt_vs_full']['mean']:+.4f}±{mm['clipt_vs_full']['se']:.4f}", flush=True)
    default, why = select_default(measured, cfg.tolerances, cfg.se_margin)
    full_gflops = float(np.mean(ref["gflops"]))
    policy = AutoPolicy(
        scheduler=cfg.scheduler, coverage=cfg.coverage, tolerances=config_dict(cfg.tolerances), default=default,
        candidates=tuple(measured),
        reference={"model": "base", "steps": cfg.reference_steps, "gflops_per_image": full_gflops,
                   "attr_acc": float(np.nanmean(ref_values[ATTR])), "clipt": float(np.mean(ref_values[CLIPT]))},
        source={"stage": "calibrate_auto", "prompts": len(prompts), "seed_offset": cfg.seed_offset,
                "default_rule": why, "se_margin": cfg.se_margin,
                "quality": "lowest of pixel/ssim, 1 - mid/lpips, high/iclip vs the full-step image",
                "lower_bound": "split conformal: the ceil((n+1)c)-th largest of n calibration values"})
    report = {"policy": policy.to_dict(), "seconds_total": round(time.time() - start, 1),
              "torch_threads": torch.get_num_threads(), "batch_size": cfg.batch_size}
    return policy, report


def load_stage_config(path=None) -> CalibrateAutoConfig:
    """params.yaml ``calibrate_auto``, its skip policy the bundle's (``bundle.skip_policy``, one
    source) unless it names one."""
    cfg = load_config("calibrate_auto", CalibrateAutoConfig, path)
    if cfg.skip_policy is None:
        cfg = replace(cfg, skip_policy=load_config("bundle", BundleConfig, path).skip_policy)
    return cfg


def main() -> None:
    try:
        cfg = load_stage_config()
        policy, report = run(cfg)
    except (CalibrateAutoError, ParamsError) as exc:
        fail(exc)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy.save(out / "auto_policy.json")
    atomic_write_json(cfg.report_path, report)
    atomic_write_bytes(cfg.plot_path, plot(policy, policy.reference["gflops_per_image"]))
    print(json.dumps({"default": policy.default, "candidates": len(policy.candidates),
                      "seconds_total": report["seconds_total"]}))


if __name__ == "__main__":
    main()
