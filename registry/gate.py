"""The promotion gate: challenger against champion on a fixed held-out validation set.

The validation set is ``prompts`` procedural scenes (``budgetdiff.scenes``) sampled from seeds
``seed_offset + i`` (95 000 000 by default: no training, tuning or benchmark seed is there), each
generated once with image seed ``seed_offset + i``. A version is judged in the gate's ``mode``
(``auto``) against its **own** full-step reference images (the same prompt and seed at the
bundle's base steps), in one Generator call:

| metric | vs | better |
|---|---|---|
| ``pixel/ssim`` | own full-step image | higher |
| ``mid/lpips_alex_randinit`` (or ``mid/lpips_alex``) | own full-step image | lower |
| ``high/iclip_domainclip`` | own full-step image | higher |
| ``high/clipt_domainclip`` | prompt | higher |
| ``domain/attr_acc`` | prompt (scene spec) | higher |
| ``cost/mean_nfe`` | - | lower |
| ``cost/unet_sample_evals`` | - (CFG pairs count twice) | lower |
| ``cost/gflops_per_image`` | - (``torch.utils.flop_counter``) | lower |

Thresholds (params ``registry.gate``): ``floors`` hold for every version (and are all the first
version is judged by); with a champion, a metric may be worse than the champion's by at most
``max_worse`` (absolute) or ``max_worse_pct`` (percent). Each metric's bound is the stricter of
the two, handed to ``mlflow.validate_evaluation_results`` as a ``MetricThreshold``; the champion
moves only when every one holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

COST_METRICS = {"cost/mean_nfe": False, "cost/unet_sample_evals": False, "cost/gflops_per_image": False}
QUALITY_DIRECTIONS = {"pixel/": True, "mid/lpips": False, "high/": True, "domain/": True}


def greater_is_better(name: str) -> bool:
    if name in COST_METRICS:
        return False
    for prefix, better in QUALITY_DIRECTIONS.items():
        if name.startswith(prefix):
            return better
    raise KeyError(f"gate: no direction known for metric {name!r}")


@dataclass(frozen=True)
class ValidationSet:
    prompts: list
    seeds: list
    mode: str
    key: str  # hash of what the numbers depend on: prompts, seeds, mode, evaluators

    @classmethod
    def build(cls, cfg: dict, evaluator_id: str) -> "ValidationSet":
        from budgetdiff.fingerprint import content_sha256
        from budgetdiff.scenes import sample_scene, spec_to_prompt

        n, offset = int(cfg["prompts"]), int(cfg["seed_offset"])
        weights = tuple(cfg.get("count_weights", (0.25, 0.25, 0.25, 0.25)))
        prompts = [spec_to_prompt(sample_scene(offset + i, count_weights=weights)) for i in range(n)]
        seeds = [offset + i for i in range(n)]
        mode = cfg.get("mode", "auto")
        key = content_sha256([prompts, seeds, mode, evaluator_id])
        return cls(prompts, seeds, mode, key)


def scorer_from_params(cfg: dict):
    """(MetricScorer on the domain evaluators named in params, an id of those evaluators)."""
    from budgetdiff.metrics import MetricScorer, ScoringConfig

    from .artifacts import directory_sha256

    ids = [directory_sha256(cfg[k])[:12] for k in ("clip_dir", "attributes_dir")]
    scorer = MetricScorer(ScoringConfig(clip_dir=cfg["clip_dir"], attributes_dir=cfg["attributes_dir"]))
    return scorer, "-".join(ids)


def evaluate(generator, valset: ValidationSet, scorer, batch_size: int = 16) -> dict[str, float]:
    """The gate's numbers for one generator: quality in ``valset.mode`` against its own
    full-step images, and cost, from one Generator call."""
    from budgetdiff.engine import GenerationRequest

    n = len(valset.prompts)
    requests = [GenerationRequest(p, mode=valset.mode, seed=s) for p, s in zip(valset.prompts, valset.seeds)]
    requests += [GenerationRequest(p, mode="full", seed=s) for p, s in zip(valset.prompts, valset.seeds)]
    results = generator(requests, output_type="pt", batch_size=batch_size)
    images = torch.stack([r.image for r in results[:n]]).float().cpu()
    refs = torch.stack([r.image for r in results[n:]]).float().cpu()
    values = scorer.score(images, refs=refs, prompts=valset.prompts)
    metrics = {name: float(np.nanmean(v)) for name, v in values.items()
               if name not in ("pixel/lsnr", "pixel/psnr")}  # psnr is unbounded at identical images
    records = [r.record.to_dict() for r in results[:n]]
    gflops = [rec["unet_gflops"] for rec in records]
    metrics["cost/mean_nfe"] = float(np.mean([r["nfe"] for r in records]))
    metrics["cost/unet_sample_evals"] = float(np.mean([r["unet_sample_evals"] for r in records]))
    metrics["cost/gflops_per_image"] = float(np.mean(gflops))
    metrics["routing/student_fraction"] = float(np.mean([r["model"]["name"] == "student" for r in records]))
    return metrics


def thresholds(cfg: dict, candidate: dict, baseline: dict | None) -> dict[str, dict]:
    """Each gated metric's bound: {name: {"threshold", "greater_is_better", "from"}}. Raises
    KeyError naming a params metric the evaluation does not produce."""
    floors = cfg.get("floors") or {}
    worse = cfg.get("max_worse") or {}
    worse_pct = cfg.get("max_worse_pct") or {}
    for name in (*floors, *worse, *worse_pct):
        if name not in candidate:
            raise KeyError(f"params registry.gate names metric {name!r}, which the gate does not measure "
                           f"(it measures {', '.join(sorted(candidate))})")
    out = {}
    for name in sorted(set(floors) | set(worse) | set(worse_pct)):
        up = greater_is_better(name)
        bounds = []
        if name in floors:
            bounds.append((float(floors[name]), "floor"))
        if baseline is not None and name in baseline:
            b = baseline[name]
            if name in worse:
                bounds.append((b - worse[name] if up else b + worse[name], f"champion {'-' if up else '+'} {worse[name]:g}"))
            if name in worse_pct:
                d = abs(b) * worse_pct[name] / 100
                bounds.append((b - d if up else b + d, f"champion {'-' if up else '+'} {worse_pct[name]:g}%"))
        if not bounds:
            continue
        value, source = (max if up else min)(bounds, key=lambda t: t[0])
        out[name] = {"threshold": value, "greater_is_better": up, "from": source}
    return out


def judge(cfg: dict, candidate: dict, baseline: dict | None) -> dict:
    """Validate ``candidate``'s metrics with ``mlflow.validate_evaluation_results``: {"passed",
    "rows": [{metric, challenger, champion, threshold, from, passed}], "failed": [names],
    "message"}."""
    import mlflow
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    bounds = thresholds(cfg, candidate, baseline)
    mlflow_thresholds = {name: MetricThreshold(threshold=b["threshold"], greater_is_better=b["greater_is_better"])
                         for name, b in bounds.items()}
    message = ""
    try:
        mlflow.validate_evaluation_results(mlflow_thresholds, EvaluationResult(candidate, {}, run_id=""),
                                           EvaluationResult(baseline, {}, run_id="") if baseline else None)
        passed = True
    except ModelValidationFailedException as exc:
        passed, message = False, exc.message
    rows, failed = [], []
    for name, b in bounds.items():
        v = candidate[name]
        ok = (v >= b["threshold"]) if b["greater_is_better"] else (v <= b["threshold"])
        ok = ok and math.isfinite(v)
        rows.append({"metric": name, "challenger": v, "champion": (baseline or {}).get(name), "threshold": b["threshold"],
                     "direction": ">=" if b["greater_is_better"] else "<=", "from": b["from"], "passed": ok})
        if not ok:
            failed.append(name)
    if passed and failed:  # the two checks must agree (NaN is the one way they could differ)
        passed = False
    return {"passed": passed, "rows": rows, "failed": failed, "message": message}
