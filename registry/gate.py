"""The promotion gate: a challenger is judged on what it promises, on held-out prompts.

The validation set is ``prompts`` procedural scenes (``budgetdiff.domain.scenes``) sampled from seeds
``seed_offset + i`` (95 000 000 by default: no training, tuning or benchmark seed is there), each
generated with image seed ``seed_offset + i``. A version is judged in the gate's ``mode`` (``auto``)
against its **own** full-step reference images (the same prompt and seed at the bundle's base
steps), all from one Generator call.

**The promise** (``mode: auto`` with the bundle's calibrated auto policy, ``budgetdiff.methods.auto_policy``):

| criterion | what the policy promises | checked as |
|---|---|---|
| ``fidelity/attr_acc``, ``fidelity/clipt`` | the default plan keeps attr_acc and CLIP-T within the policy's ``tolerances`` of its full-step images | paired difference (auto - own full-step image) over the prompts: mean + ``fidelity_z`` standard errors >= -tolerance |
| ``coverage/q<q>`` for each ``promise.quality_targets`` q | a request asking for ``quality_target`` q gets realised quality >= q (``budgetdiff.statistics.quality``) for >= ``coverage`` (95 %) of requests | the share of prompts reaching q: its one-sided Wilson upper bound (z = ``coverage_z``) >= coverage |

A promise check fails only when the held-out data refute the promise at that confidence. A
challenger without a calibrated auto policy promises neither, and fails ``auto_policy`` when the
champion had one.

**The rules** (params ``registry.gate.rules.<mode>``): ``floors`` hold for every version (with the
promise, all the first version is judged by); with a champion, a metric may be worse than the
champion's by at most ``max_worse`` (absolute) or ``max_worse_pct`` (percent); each bound is the
stricter of the two. Pixel similarity (``pixel/ssim``, LPIPS, I-CLIP against the full-step image)
is measured and reported for every mode but gated only where a mode's rules name it: auto does not
promise pixel similarity to the 50-step image, only prompt fidelity and quality coverage.

Measured per version (cached on its version tags, ``gate.metrics``):

| metric | vs | better |
|---|---|---|
| ``pixel/ssim``, ``mid/lpips_alex_randinit``, ``high/iclip_domainclip`` | own full-step image | higher, lower, higher |
| ``quality/mean`` | own full-step image (realised quality, ``budgetdiff.statistics.quality``) | higher |
| ``high/clipt_domainclip``, ``domain/attr_acc`` | prompt | higher |
| ``cost/mean_nfe``, ``cost/unet_sample_evals`` (CFG pairs count twice), ``cost/gflops_per_image`` | - | lower |
| ``promise/...`` | the auto policy's promise: paired differences, shares reaching each target | - |

Every criterion's bound goes to ``mlflow.validate_evaluation_results`` as a ``MetricThreshold``;
the champion moves only when every one holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from budgetdiff.statistics.quality import mean_quality, realised_quality, share_reaching, wilson_bounds

GATE_FORMAT = "gate/2"  # in the validation-set key: numbers an older gate measured are not reused
COST_METRICS = {"cost/mean_nfe": False, "cost/unet_sample_evals": False, "cost/gflops_per_image": False}
QUALITY_DIRECTIONS = {"pixel/": True, "mid/lpips": False, "high/": True, "domain/": True, "quality/": True}
ATTR = "domain/attr_acc"
FIDELITY = {"attr_acc": ATTR, "clipt": "high/clipt"}  # the auto policy's tolerance name -> metric (prefix)


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
    key: str  # hash of what the numbers depend on: prompts, seeds, mode, targets, evaluators, gate format
    quality_targets: tuple = ()  # auto: the quality_target values whose coverage is checked

    @classmethod
    def build(cls, cfg: dict, evaluator_id: str) -> "ValidationSet":
        from budgetdiff.io.fingerprint import content_sha256
        from budgetdiff.domain.scenes import sample_scene, spec_to_prompt

        n, offset = int(cfg["prompts"]), int(cfg["seed_offset"])
        weights = tuple(cfg.get("count_weights", (0.25, 0.25, 0.25, 0.25)))
        prompts = [spec_to_prompt(sample_scene(offset + i, count_weights=weights)) for i in range(n)]
        seeds = [offset + i for i in range(n)]
        mode = cfg.get("mode", "auto")
        targets = tuple(float(q) for q in (cfg.get("promise") or {}).get("quality_targets") or ())
        for q in targets:
            if not 0 < q <= 1:
                raise ValueError(f"registry.gate.promise.quality_targets: {q:g} is outside (0, 1]")
        key = content_sha256([GATE_FORMAT, prompts, seeds, mode, list(targets), evaluator_id], 16)
        return cls(prompts, seeds, mode, key, targets)


def scorer_from_params(cfg: dict):
    """(MetricScorer on the domain evaluators named in params, an id of those evaluators)."""
    from budgetdiff.metrics import MetricScorer, ScoringConfig

    from .artifacts import directory_sha256

    ids = [directory_sha256(cfg[k])[:12] for k in ("clip_dir", "attributes_dir")]
    scorer = MetricScorer(ScoringConfig(clip_dir=cfg["clip_dir"], attributes_dir=cfg["attributes_dir"]))
    return scorer, "-".join(ids)


def _metric(values: dict, prefix: str) -> str | None:
    return next((k for k in sorted(values) if k.startswith(prefix)), None)


def _paired(diff: np.ndarray) -> tuple[float, float, int]:
    d = diff[np.isfinite(diff)]
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return (float(d.mean()) if len(d) else float("nan")), se, int(len(d))


def evaluate(generator, valset: ValidationSet, scorer, batch_size: int = 16) -> dict[str, float]:
    """The gate's numbers for one generator, from one Generator call: quality in ``valset.mode``
    against its own full-step images, cost, and (auto with a calibrated policy) what the policy
    promised: paired attr_acc / CLIP-T differences to the full-step images, and per quality target
    the prompts whose realised quality reaches it."""
    from budgetdiff.generation.engine import GenerationRequest

    n = len(valset.prompts)
    pairs = list(zip(valset.prompts, valset.seeds))
    policy = generator.auto_policy if valset.mode == "auto" else None
    targets = valset.quality_targets if policy is not None else ()
    requests = [GenerationRequest(p, mode=valset.mode, seed=s) for p, s in pairs]
    requests += [GenerationRequest(p, mode="full", seed=s) for p, s in pairs]
    for q in targets:
        requests += [GenerationRequest(p, mode="auto", quality_target=q, seed=s) for p, s in pairs]
    results = generator(requests, output_type="pt", batch_size=batch_size)

    def images(block: int) -> torch.Tensor:
        return torch.stack([r.image for r in results[block * n:(block + 1) * n]]).float().cpu()

    refs = images(1)
    values = scorer.score(images(0), refs=refs, prompts=valset.prompts)
    metrics = {name: float(np.nanmean(v)) for name, v in values.items()
               if name not in ("pixel/lsnr", "pixel/psnr")}  # psnr is unbounded at identical images
    metrics["quality/mean"] = mean_quality(realised_quality(values))
    records = [r.record.to_dict() for r in results[:n]]
    metrics["cost/mean_nfe"] = float(np.mean([r["nfe"] for r in records]))
    metrics["cost/unet_sample_evals"] = float(np.mean([r["unet_sample_evals"] for r in records]))
    metrics["cost/gflops_per_image"] = float(np.mean([r["unet_gflops"] for r in records]))
    metrics["routing/student_fraction"] = float(np.mean([r["model"]["name"] == "student" for r in records]))
    if policy is None:
        return metrics

    metrics["promise/coverage"] = float(policy.coverage)
    ref_values = scorer.score(refs, prompts=valset.prompts)
    for short, prefix in FIDELITY.items():
        name = _metric(values, prefix)
        if name is None or short not in policy.tolerances:
            continue
        mean, se, count = _paired(np.asarray(values[name], float) - np.asarray(ref_values[name], float))
        metrics.update({f"promise/{short}_vs_full/mean": mean, f"promise/{short}_vs_full/se": se,
                        f"promise/{short}_vs_full/n": float(count),
                        f"promise/{short}_vs_full/tolerance": float(policy.tolerances[short])})
    for block, q in enumerate(targets, start=2):
        quality = realised_quality(scorer.score(images(block), refs=refs))
        block_records = [r.record for r in results[block * n:(block + 1) * n]]  # ImageRecord
        metrics.update({f"promise/q{q:g}/reached": float(round(share_reaching(quality, q) * n)),
                        f"promise/q{q:g}/n": float(n),
                        f"promise/q{q:g}/mean_quality": mean_quality(quality),
                        f"promise/q{q:g}/gflops_per_image": float(np.mean([r.unet_gflops for r in block_records]))})
    return metrics


def promise_criteria(cfg: dict, candidate: dict, baseline: dict | None) -> list[dict]:
    """The promise rows (module docstring): {"metric", "kind": "promise", "value", "champion",
    "threshold", "greater_is_better", "from", "measured"}."""
    promise = cfg.get("promise") or {}
    z_fid, z_cov = float(promise.get("fidelity_z", 1.96)), float(promise.get("coverage_z", 1.96))

    def fidelity(m: dict, short: str) -> float | None:
        if f"promise/{short}_vs_full/mean" not in m:
            return None
        return m[f"promise/{short}_vs_full/mean"] + z_fid * m[f"promise/{short}_vs_full/se"]

    def coverage_upper(m: dict, q: str) -> float | None:
        if f"promise/q{q}/n" not in m:
            return None
        n = int(m[f"promise/q{q}/n"])
        return wilson_bounds(m[f"promise/q{q}/reached"] / n, n, z_cov)[1]

    rows = []
    if "promise/coverage" not in candidate:
        if baseline is not None and "promise/coverage" in baseline:
            rows.append({"metric": "auto_policy", "kind": "promise", "value": 0.0, "champion": 1.0, "threshold": 1.0,
                         "greater_is_better": True, "from": "the champion promises a calibrated auto policy",
                         "measured": "the challenger has no calibrated auto policy"})
        return rows
    for short in FIDELITY:
        value = fidelity(candidate, short)
        if value is None:
            continue
        tol = candidate[f"promise/{short}_vs_full/tolerance"]
        mean, se = candidate[f"promise/{short}_vs_full/mean"], candidate[f"promise/{short}_vs_full/se"]
        rows.append({"metric": f"fidelity/{short}", "kind": "promise", "value": value,
                     "champion": fidelity(baseline, short) if baseline else None, "threshold": -tol,
                     "greater_is_better": True,
                     "from": f"auto policy: within {tol:g} of full-step (mean + {z_fid:g} se)",
                     "measured": f"paired mean {mean:+.4f}, se {se:.4f}, "
                                 f"n {int(candidate[f'promise/{short}_vs_full/n'])}"})
    coverage = candidate["promise/coverage"]
    for key in sorted(k for k in candidate if k.startswith("promise/q") and k.endswith("/n")):
        q = key[len("promise/q"):-len("/n")]
        n, reached = int(candidate[key]), int(candidate[f"promise/q{q}/reached"])
        rows.append({"metric": f"coverage/q{q}", "kind": "promise", "value": coverage_upper(candidate, q),
                     "champion": coverage_upper(baseline, q) if baseline else None, "threshold": coverage,
                     "greater_is_better": True,
                     "from": f"auto policy: >= {coverage:.0%} reach {q} (Wilson upper, z {z_cov:g})",
                     "measured": f"{reached}/{n} reach {q}"})
    return rows


def rules_for(cfg: dict) -> dict:
    """The judged mode's floors and no-regression bounds (``rules.<mode>``; none: only the promise)."""
    mode = cfg.get("mode", "auto")
    rules = (cfg.get("rules") or {}).get(mode) or {}
    unknown = set(rules) - {"floors", "max_worse", "max_worse_pct"}
    if unknown:
        raise KeyError(f"registry.gate.rules.{mode}: unknown key(s) {', '.join(sorted(unknown))} "
                       "(floors, max_worse, max_worse_pct)")
    return rules


def thresholds(rules: dict, candidate: dict, baseline: dict | None) -> dict[str, dict]:
    """Each ruled metric's bound: {name: {"threshold", "greater_is_better", "from"}}. Raises
    KeyError naming a params metric the evaluation does not produce."""
    floors = rules.get("floors") or {}
    worse = rules.get("max_worse") or {}
    worse_pct = rules.get("max_worse_pct") or {}
    for name in (*floors, *worse, *worse_pct):
        if name not in candidate:
            raise KeyError(f"params registry.gate.rules names metric {name!r}, which the gate does not measure "
                           f"(it measures {', '.join(sorted(k for k in candidate if not k.startswith('promise/')))})")
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
    """Every criterion (the promise, then the mode's rules) validated with
    ``mlflow.validate_evaluation_results``: {"passed", "rows": [{metric, kind, challenger, champion,
    threshold, direction, from, passed, measured}], "failed": [names], "message"}."""
    import mlflow
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    criteria = promise_criteria(cfg, candidate, baseline)
    for name, b in thresholds(rules_for(cfg), candidate, baseline).items():
        kind = "floor" if b["from"] == "floor" else "no-regression"
        criteria.append({"metric": name, "kind": kind, "value": candidate[name],
                         "champion": (baseline or {}).get(name), **b})
    values = {c["metric"]: c["value"] for c in criteria}
    mlflow_thresholds = {c["metric"]: MetricThreshold(threshold=c["threshold"], greater_is_better=c["greater_is_better"])
                         for c in criteria}
    message = ""
    try:
        mlflow.validate_evaluation_results(mlflow_thresholds, EvaluationResult(values, {}, run_id=""), None)
        passed = True
    except ModelValidationFailedException as exc:
        passed, message = False, exc.message
    rows, failed = [], []
    for c in criteria:
        v = c["value"]
        ok = math.isfinite(v) and ((v >= c["threshold"]) if c["greater_is_better"] else (v <= c["threshold"]))
        rows.append({"metric": c["metric"], "kind": c["kind"], "challenger": v, "champion": c["champion"],
                     "threshold": c["threshold"], "direction": ">=" if c["greater_is_better"] else "<=",
                     "from": c["from"], "passed": ok, **({"measured": c["measured"]} if "measured" in c else {})})
        if not ok:
            failed.append(c["metric"])
    if passed and failed:  # the two checks must agree (NaN is the one way they could differ)
        passed = False
    return {"passed": passed, "rows": rows, "failed": failed, "message": message}
