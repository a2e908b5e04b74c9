"""``promote``: run the gate (``registry.gate``) on the challenger and move ``champion`` when it
passes. The verdict and the numbers go to the challenger's version tags (``gate.*``; the verdict
per criterion in ``gate.criteria``, which ``budgetdiff-registry list`` shows) and to an MLflow run
in the registry's experiment (``challenger/<metric>``, ``champion/<metric>``, thresholds as
params, ``gate.json`` as an artifact)."""

from __future__ import annotations

import json
import time

from mlops.tracking import git_commit

from . import CHALLENGER, CHAMPION, MODEL_NAME, RegistryError
from .gate import ValidationSet, evaluate, judge, scorer_from_params
from .store import connect, experiment_id, set_champion, tag_key, version_by_alias


def load_generator(version: str):
    """The ``Generator`` inside registered version ``version``, loaded as any user loads it
    (``mlflow.pyfunc.load_model("models:/budgetdiff/<version>")``)."""
    import mlflow

    return mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/{version}").unwrap_python_model().generator


def version_metrics(client, mv, valset: ValidationSet, scorer, batch_size: int, log=print) -> tuple[dict, bool]:
    """(metrics of version ``mv`` on ``valset``, whether they came from its tags): a version's
    own numbers do not depend on what it is compared with, so a gate run on the same validation
    set and evaluators reuses them."""
    version = str(mv.version)
    if mv.tags.get("gate.valset") == valset.key and mv.tags.get("gate.metrics"):
        return json.loads(mv.tags["gate.metrics"]), True
    targets = f" + quality targets {', '.join(f'{q:g}' for q in valset.quality_targets)}" if valset.quality_targets else ""
    log(f"gate: evaluating version {version} on {len(valset.prompts)} prompts (mode {valset.mode} + full-step "
        f"references{targets})")
    start = time.perf_counter()
    metrics = evaluate(load_generator(version), valset, scorer, batch_size)
    log(f"gate: version {version} evaluated in {time.perf_counter() - start:.0f} s")
    client.set_model_version_tag(MODEL_NAME, version, "gate.valset", valset.key)
    client.set_model_version_tag(MODEL_NAME, version, "gate.metrics", json.dumps(metrics, sort_keys=True))
    return metrics, False


def promote(cfg: dict, version: str | None = None, client=None, scorer=None, evaluator_id: str | None = None,
            log=print) -> dict:
    """Judge the challenger (or ``version``) against the champion; move ``champion`` when every
    threshold holds. Returns the gate result (``verdict``: promoted | refused | unchanged)."""
    import mlflow

    client = client or connect()
    if version is not None:
        from mlflow.exceptions import MlflowException

        try:
            challenger = client.get_model_version(MODEL_NAME, str(version))
        except MlflowException:
            raise RegistryError(f"version: {MODEL_NAME} has no version {version}") from None
    else:
        challenger = version_by_alias(client, CHALLENGER)
        if challenger is None:
            raise RegistryError(f"promote: {MODEL_NAME} has no {CHALLENGER}; register a bundle first")
    champion = version_by_alias(client, CHAMPION)
    if champion is not None and str(champion.version) == str(challenger.version):
        return {"verdict": "unchanged", "challenger": str(challenger.version), "champion": str(champion.version),
                "why": f"version {challenger.version} is the champion already"}
    if scorer is None:
        scorer, evaluator_id = scorer_from_params(cfg)
    valset = ValidationSet.build(cfg, evaluator_id or "unspecified")
    batch_size = int(cfg.get("batch_size", 16))
    candidate, cached_c = version_metrics(client, challenger, valset, scorer, batch_size, log)
    baseline, cached_b = (version_metrics(client, champion, valset, scorer, batch_size, log) if champion
                          else (None, False))
    verdict = judge(cfg, candidate, baseline)
    c_version, b_version = str(challenger.version), str(champion.version) if champion else None
    against = f"version {b_version}" if champion else "floors (first champion)"
    result = {"verdict": "promoted" if verdict["passed"] else "refused", "challenger": c_version,
              "champion_before": b_version, "against": against,
              "validation_set": {"key": valset.key, "prompts": len(valset.prompts), "seed_offset": cfg["seed_offset"],
                                 "mode": valset.mode, "quality_targets": list(valset.quality_targets)},
              "reused_metrics": {"challenger": cached_c, "champion": cached_b},
              "challenger_metrics": candidate, "champion_metrics": baseline, **verdict}

    with mlflow.start_run(experiment_id=experiment_id(client),
                          run_name=f"gate v{c_version} vs {'v' + b_version if champion else 'floors'}",
                          tags={"git_commit": git_commit(), "dvc_stage": "register", "gate.verdict": result["verdict"],
                                "challenger_version": c_version,
                                "champion_version": b_version or "none"}) as run:
        mlflow.log_params({tag_key(f"threshold.{r['metric']}"): f"{r['direction']} {r['threshold']:.6g} ({r['from']})"
                           for r in verdict["rows"]})
        mlflow.log_params({"valset.key": valset.key, "valset.prompts": len(valset.prompts),
                           "valset.seed_offset": cfg["seed_offset"], "valset.mode": valset.mode})
        mlflow.log_metrics({tag_key(f"challenger/{k}"): v for k, v in candidate.items()})
        if baseline:
            mlflow.log_metrics({tag_key(f"champion/{k}"): v for k, v in baseline.items()})
        mlflow.log_dict(result, "gate.json")
    result["run_id"] = run.info.run_id
    tags = {"gate.verdict": result["verdict"], "gate.against": against, "gate.run_id": run.info.run_id,
            "gate.failed": ",".join(verdict["failed"]) or "none",
            "gate.criteria": json.dumps(criteria_tag(verdict["rows"]), separators=(",", ":")),
            "gate.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tags.update({tag_key(f"gate.value.{k}"): f"{v:.6g}" for k, v in candidate.items()})
    for key, value in tags.items():
        client.set_model_version_tag(MODEL_NAME, c_version, key, value)
    if verdict["passed"]:
        set_champion(client, c_version, by="promote")
    result["champion"] = c_version if verdict["passed"] else b_version
    return result


def criteria_tag(rows: list[dict]) -> list[dict]:
    """The verdict per criterion, as the ``gate.criteria`` version tag keeps it (compact)."""
    return [{"metric": r["metric"], "kind": r["kind"], "passed": r["passed"], "value": round(r["challenger"], 6),
             "bound": f"{r['direction']} {r['threshold']:.6g}"} for r in rows]


def format_gate(result: dict) -> str:
    """The gate's table, for the terminal."""
    if result["verdict"] == "unchanged":
        return f"gate: {result['why']}"
    lines = [f"gate: version {result['challenger']} against {result['against']}: {result['verdict'].upper()}",
             f"  {'criterion':<24} {'kind':<13} {'challenger':>11} {'champion':>11}   {'bound':<48} ok"]
    for r in result["rows"]:
        champ = "-" if r["champion"] is None else f"{r['champion']:.4f}"
        bound = f"{r['direction']} {r['threshold']:.4f} ({r['from']})"
        lines.append(f"  {r['metric']:<24} {r['kind']:<13} {r['challenger']:>11.4f} {champ:>11}   {bound:<48} "
                     f"{'yes' if r['passed'] else 'NO'}" + (f"   [{r['measured']}]" if r.get("measured") else ""))
    if result["failed"]:
        lines.append(f"  failing: {', '.join(result['failed'])}")
    return "\n".join(lines)
