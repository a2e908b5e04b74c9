"""``promote``: run the gate (``registry.gate``) on the challenger and move ``champion`` when it
passes. The verdict and the numbers go to the challenger's version tags (``gate.*``; the verdict
per criterion in ``gate.criteria``, which ``budgetdiff-registry list`` shows) and to an MLflow run
in the registry's experiment (``challenger/<metric>``, ``champion/<metric>``, thresholds as
params, ``gate.json`` as an artifact).

Idempotent: a version's numbers are kept on its tags (``gate.metrics``), and a gate that judges
the same numbers against the same bounds and champion again logs nothing new (the result's hash,
``gate.result_sha256``, matches), so ``dvc repro`` may run the ``register`` stage every time."""

from __future__ import annotations

import json
import time

from budgetdiff.io.fingerprint import content_sha256
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
    threshold holds. Returns the gate result (``verdict``: promoted | refused | unchanged).

    A version judged before on the same numbers, bounds and champion is not logged again and does
    not move ``champion`` (the result then has ``why``): re-running is a no-op."""
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

    # Judged exactly so before (a re-run of the stage): nothing new to log, and champion stays
    # where it is (a rollback since then holds; the gate moves champion only on a new judgement).
    result_sha = content_sha256({k: v for k, v in result.items() if k != "reused_metrics"}, None)
    if challenger.tags.get("gate.result_sha256") == result_sha and challenger.tags.get("gate.run_id"):
        return {**result, "run_id": challenger.tags["gate.run_id"], "champion": b_version,
                "why": f"version {c_version} was judged so before (run {challenger.tags['gate.run_id']})"}
    result["run_id"] = log_gate_run(client, result, verdict["rows"], candidate, baseline)
    tags = {"gate.verdict": result["verdict"], "gate.against": against, "gate.run_id": result["run_id"],
            "gate.failed": ",".join(verdict["failed"]) or "none",
            "gate.criteria": json.dumps(criteria_tag(verdict["rows"]), separators=(",", ":")),
            "gate.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tags.update({tag_key(f"gate.value.{k}"): f"{v:.6g}" for k, v in candidate.items()})
    for key, value in tags.items():
        client.set_model_version_tag(MODEL_NAME, c_version, key, value)
    if verdict["passed"]:
        set_champion(client, c_version, by="promote")
    # last: a gate interrupted before this point is judged (and its champion moved) again next time
    client.set_model_version_tag(MODEL_NAME, c_version, "gate.result_sha256", result_sha)
    result["champion"] = c_version if verdict["passed"] else b_version
    return result


def log_gate_run(client, result: dict, rows: list[dict], candidate: dict, baseline: dict | None) -> str:
    """One run in the registry's experiment for a gate: thresholds as params, both versions'
    numbers as metrics, the whole result as ``gate.json``. Returns its run id."""
    import mlflow

    c_version, b_version = result["challenger"], result["champion_before"]
    with mlflow.start_run(experiment_id=experiment_id(client),
                          run_name=f"gate v{c_version} vs {'v' + b_version if b_version else 'floors'}",
                          tags={"git_commit": git_commit(), "dvc_stage": "register", "gate.verdict": result["verdict"],
                                "challenger_version": c_version,
                                "champion_version": b_version or "none"}) as run:
        mlflow.log_params({tag_key(f"threshold.{r['metric']}"): f"{r['direction']} {r['threshold']:.6g} ({r['from']})"
                           for r in rows})
        valset = result["validation_set"]
        mlflow.log_params({"valset.key": valset["key"], "valset.prompts": valset["prompts"],
                           "valset.seed_offset": valset["seed_offset"], "valset.mode": valset["mode"]})
        mlflow.log_metrics({tag_key(f"challenger/{k}"): v for k, v in candidate.items()})
        if baseline:
            mlflow.log_metrics({tag_key(f"champion/{k}"): v for k, v in baseline.items()})
        mlflow.log_dict(result, "gate.json")
    return run.info.run_id


def judged_result(client, version: str) -> dict | None:
    """The result of the gate that last judged ``version`` (its ``gate.json``), or None when no
    gate judged it (a champion set by hand)."""
    import mlflow

    run_id = client.get_model_version(MODEL_NAME, str(version)).tags.get("gate.run_id")
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/gate.json") if run_id else None


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
