"""DVC stage ``bundle``: assemble the served model bundle (``models/bundle``) from what was measured.

Nothing in the bundle is typed by hand:
- the skip policy is the file Ray Tune's ``tune_skip`` wrote (``bundle.skip_policy.policy``), or
  the operating points of a benchmark report (``bundle.skip_policy.report``: ``bench_adaptive``'s
  δ sweep, every paper-estimator row with its NFE speed-up and its quality against the full-step
  image, the default point being the δ ``bench_adaptive`` tuned per scheduler);
- the student's guidance is the one ``bench_distill`` judged its targets at;
- ``auto``'s student guidance is the cheapest guidance (fewest UNet GFLOPs per image) at which
  ``bench_distill`` measured the student within ``auto.tolerances`` of the reference run's
  attr_acc and CLIP-T;
- the budget rule's ε is the one ``train_budget`` calibrated (the predictor's config);
- ``auto``'s calibrated policy is the file ``calibrate_auto`` wrote (``bundle.auto.policy``),
  embedded in bundle.json so the bundle's hash covers it.

Writes ``models/bundle/bundle.json`` and ``models/bundle/skip_policy.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from budgetdiff.generation.bundle import write_bundle
from budgetdiff.io.fingerprint import file_sha256
from budgetdiff.methods.policy import OperatingPoint, SchedulerPolicy, SkipPolicy
from budgetdiff.statistics.quality import QUALITY_LEVELS, realised_quality
from budgetdiff.methods.adaptive import AdaptiveSkipConfig
from mlops.cli import fail
from mlops.params import load_config


@dataclass(frozen=True)
class BaseModelConfig:
    """params.yaml ``bundle.base``."""

    path: str
    scheduler: str
    steps: int


@dataclass(frozen=True)
class StudentConfig:
    """params.yaml ``bundle.student``."""

    path: str
    run: str     # the student's run in ``report``
    report: str  # bench_distill's report


@dataclass(frozen=True)
class SkipPolicySource:
    """params.yaml ``bundle.skip_policy``: a tuning stage's policy file (``policy``), else the
    operating points of a benchmark ``report``; one of the two is given."""

    stage: str = "bench_adaptive"  # the stage that wrote ``report``
    report: Optional[str] = None
    policy: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class AutoConfig:
    """params.yaml ``bundle.auto``."""

    policy: Optional[str] = None  # None: auto routes by the older rule (student_max_steps)
    student_max_steps: int
    reference_run: str
    tolerances: dict[str, float]  # metric of bench_distill's report -> allowed drop


@dataclass(frozen=True)
class BundleConfig:
    """params.yaml ``bundle``."""

    output_dir: str
    base: BaseModelConfig
    student: StudentConfig
    budget: str
    skip_policy: SkipPolicySource
    auto: AutoConfig


class BundleStageError(ValueError):
    """A report the bundle is built from lacks what the stage needs."""


def _read_json(path: str, what: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise BundleStageError(f"bundle.{what}: {path!r} does not exist (run the stage that writes it)")
    return json.loads(p.read_text())


def skip_policy_from_adaptive_report(report: dict, source: dict) -> SkipPolicy:
    """The measured operating points of ``bench_adaptive``'s report: per scheduler, every
    paper-estimator δ row (NFE speed-up, level metrics, quality); the tuned δ is the default."""
    schedulers = {}
    for name, entry in report["schedulers"].items():
        reuse = report["reuse"][name] if isinstance(report["reuse"], dict) else report["reuse"]
        points = []
        for row in entry["rows"]:
            if row.get("kind") != "adaptive" or "threshold" not in (row.get("params") or {}):
                continue
            delta = float(row["params"]["threshold"])
            levels = {k: row[k] for k in row if k.startswith(QUALITY_LEVELS)}
            measured = {"nfe_speedup": row["nfe_speedup"], "mean_nfe": row["mean_nfe"],
                        "quality": round(realised_quality(levels), 6),
                        **{k: row[k] for k in sorted(levels)},
                        **{k: row[k] for k in ("pixel/psnr", "domain/attr_acc_vs_full") if k in row}}
            config = AdaptiveSkipConfig(threshold=delta, max_skip=int(report["max_skip"]),
                                        warmup=int(report["warmup"]), reuse=reuse)
            points.append(OperatingPoint(f"delta={delta:g}", config, measured))
        if not points:
            raise BundleStageError(f"bundle.skip_policy: the report has no adaptive rows for {name}")
        tuned = report.get("tuned_thresholds", {}).get(name)
        default = f"delta={float(tuned):g}" if tuned is not None else points[0].name
        schedulers[name] = SchedulerPolicy(default, tuple(sorted(points, key=lambda p: p.config.threshold)))
    return SkipPolicy(schedulers, source, int(report["steps"]))


def skip_policy_for(source: SkipPolicySource) -> SkipPolicy:
    """The bundle's skip policy: a policy file a tuning stage wrote (``policy``: tune_skip's
    models/skip_policy/skip_policy.json), or the operating points of a benchmark report
    (``report``: bench_adaptive's δ sweep)."""
    if source.policy:
        from budgetdiff.methods.policy import PolicyError, load_skip_policy

        path = source.policy
        try:
            loaded = load_skip_policy(path)
        except PolicyError as exc:
            raise BundleStageError(f"bundle.skip_policy.policy: {exc}") from None
        source = {**loaded.source, "policy_file": path, "policy_file_sha256": file_sha256(path, 16)}
        return SkipPolicy(loaded.schedulers, source, loaded.steps)
    report_path = source.report
    if not report_path:
        raise BundleStageError("bundle.skip_policy: give a policy file (policy) or a report")
    adaptive = _read_json(report_path, "skip_policy.report")
    return skip_policy_from_adaptive_report(
        adaptive, {"stage": source.stage, "report": report_path,
                   "report_sha256": file_sha256(report_path, 16),
                   "selection": "default: the delta bench_adaptive tuned per scheduler; points: its delta sweep"})


def cheapest_guidance_within(distill: dict, run: str, reference_run: str, reference_guidance: str,
                             tolerances: dict) -> tuple[float, dict]:
    """The guidance with the fewest GFLOPs per image at which ``run`` stays within
    ``tolerances`` ({metric: allowed drop}) of ``reference_run`` at ``reference_guidance`` (the
    guidance the student was judged at; at equal cost the nearest to it wins)."""
    results = distill["results"]
    if run not in results or reference_run not in results:
        raise BundleStageError(f"bundle.auto: the distillation report has no run {run!r} or {reference_run!r}")
    ref = results[reference_run][reference_guidance]
    candidates = []
    for g, m in results[run].items():
        drops = {k: ref[k] - m[k] for k in tolerances}
        if all(drops[k] <= tol for k, tol in tolerances.items()):
            # equal cost: the guidance nearest the one the student was judged at
            candidates.append((m["gflops_per_image"], abs(float(g) - float(reference_guidance)), float(g), drops))
    if not candidates:  # none is within: the guidance the student was judged at, flagged
        m = results[run][reference_guidance]
        drops = {k: ref[k] - m[k] for k in tolerances}
        return float(reference_guidance), {"within_tolerances": False, "gflops_per_image": m["gflops_per_image"],
                                           "drops_vs_reference": {k: round(v, 5) for k, v in drops.items()},
                                           "reference": f"{reference_run}@{reference_guidance}"}
    gflops, _, guidance, drops = min(candidates)
    return guidance, {"within_tolerances": True, "gflops_per_image": gflops,
                      "drops_vs_reference": {k: round(v, 5) for k, v in drops.items()},
                      "reference": f"{reference_run}@{reference_guidance}"}


def build(cfg: BundleConfig) -> dict:
    out = Path(cfg.output_dir)
    policy = skip_policy_for(cfg.skip_policy)
    distill_path = cfg.student.report
    distill = _read_json(distill_path, "student.report")
    judged = distill["target_guidance"]
    judged_key = next((k for k in distill["results"][cfg.student.run] if float(k) == float(judged)), None)
    if judged_key is None:
        raise BundleStageError(f"bundle.student: {distill_path} has no result at guidance {judged}")
    auto_cfg = cfg.auto
    auto_guidance, why = cheapest_guidance_within(distill, cfg.student.run, auto_cfg.reference_run,
                                                  judged_key, auto_cfg.tolerances)
    budget_config = _read_json(os.path.join(cfg.budget, "config.json"), "budget")

    def rel(path: str) -> str:
        return os.path.relpath(path, out)

    raw = {
        "base": {"path": rel(cfg.base.path), "scheduler": cfg.base.scheduler, "steps": cfg.base.steps},
        "student": {"path": rel(cfg.student.path), "steps": int(distill["runs"][cfg.student.run]["steps"]),
                    "scheduler": distill.get("scheduler", "ddim"), "guidance": float(judged),
                    "source": f"{distill_path}: target_guidance"},
        "budget": {"path": rel(cfg.budget), "plateau_epsilon": float(budget_config["rules"]["plateau_epsilon"]),
                   "source": f"{cfg.budget}/config.json: rules.plateau_epsilon (calibrated by train_budget)"},
        "auto": {"student_max_steps": auto_cfg.student_max_steps, "student_guidance": auto_guidance,
                 "scheduler": cfg.base.scheduler,
                 "source": {"student_guidance": {"rule": "fewest GFLOPs within tolerances", "tolerances":
                                                 auto_cfg.tolerances, "report": distill_path, **why},
                            "student_max_steps": "params.yaml bundle.auto.student_max_steps"}},
    }
    auto_policy = None
    if auto_cfg.policy:
        from budgetdiff.methods.auto_policy import load_auto_policy

        auto_policy = load_auto_policy(auto_cfg.policy)
        raw["auto"]["policy"] = auto_policy.to_dict()
        raw["auto"]["source"]["policy"] = f"{auto_cfg.policy} (calibrate_auto)"
    write_bundle(out, raw, policy)
    return {"output_dir": str(out), "skip_policy_sha256": policy.sha256,
            "auto_policy": {"default": auto_policy.default, "sha256": auto_policy.sha256} if auto_policy else None,
            "defaults": {s: p.default for s, p in policy.schedulers.items()},
            "student_guidance": float(judged), "auto_student_guidance": auto_guidance}


def main() -> None:
    try:
        summary = build(load_config("bundle", BundleConfig))
    except (BundleStageError, ValueError, KeyError) as exc:
        fail(f"bundle: {exc}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
