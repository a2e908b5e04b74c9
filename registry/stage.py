"""DVC stage ``register``: the last stage of ``dvc repro``.

Registers the bundle the pipeline built (a new version with alias ``challenger``, unless a
version already holds a bundle with the same content hash), runs the gate on **that** version (the
bundle ``bench_auto`` measured, whichever version holds it) and moves ``champion`` to it when the
gate passes, then writes ``reports/registry.json``. A refused challenger is recorded in the report, not
raised: the pipeline's outputs stay valid and ``champion`` stays where it was
(``registry.fail_on_refusal: true`` makes a refusal fail the stage instead).

The tracking store is not part of the repository (``mlflow.db`` is git-ignored), so DVC cannot
tell whether it holds the bundle: the stage is ``always_changed`` and idempotent. A fresh clone's
``dvc repro`` (an empty store) registers the bundle, judges it and makes it champion; a re-run
registers nothing (the version holding the same content hash is reused), logs no new gate run
(the same judgement is found on the version) and writes the same ``reports/registry.json`` byte for
byte: the report says what the registry holds (the version, the gate result that judged it, the
aliases), never when or how long (those go to stdout), so nothing below it re-runs.
"""

from __future__ import annotations

import json
import sys
import time

from budgetdiff.io import atomic_write_json
from mlops.cli import print_error
from mlops.tracking import tracking_uri

from . import MODEL_NAME, RegistryError
from .cli import RegistryConfig, load_registry_params
from .promote import format_gate, judged_result, promote
from .store import aliases, champion_history, connect, register


GATE_KEYS = ("verdict", "challenger", "against", "champion", "failed", "rows", "criteria", "challenger_metrics",
             "champion_metrics", "validation_set", "why")


def run(cfg: RegistryConfig, client=None, scorer=None, evaluator_id=None) -> dict:
    """Register ``cfg.bundle``, judge its version, and return the report (module docstring)."""
    start = time.perf_counter()
    client = client or connect()
    registered = register(cfg.bundle, cfg.reports, client)
    print(f"register: {'version ' + registered['version'] if registered['registered'] else registered['why']}")
    gate = promote(cfg.gate, version=registered["version"], client=client, scorer=scorer,
                   evaluator_id=evaluator_id, log=lambda m: print(m, file=sys.stderr))
    print(format_gate(gate))
    if gate["verdict"] == "unchanged":  # the champion already: report the gate that made it champion
        gate = {**(judged_result(client, gate["champion"]) or champion_tags(client, gate["champion"])),
                "champion": gate["champion"]}
    elif "why" in gate:  # judged so before: the same result, as that gate's run recorded it
        gate = {**judged_result(client, gate["challenger"]), "champion": gate["champion"]}
    uri = tracking_uri()
    print(f"register: {time.perf_counter() - start:.1f} s")
    return {
        "model": MODEL_NAME,
        "tracking_uri": uri if uri.startswith(("http://", "https://")) else "sqlite (MLFLOW_TRACKING_URI default)",
        "bundle": cfg.bundle,
        "bundle_sha256": registered["bundle_sha256"],
        "registered": True,  # the bundle is a version of the registered model (by this run or an earlier one)
        "version": registered["version"],
        "gate": {k: gate.get(k) for k in GATE_KEYS if k in gate},
        "aliases": aliases(client),
        "champion_history": [h["version"] for h in champion_history(client)],
    }


def champion_tags(client, version: str) -> dict:
    """A champion no gate run judged (set by hand): what its ``gate.*`` tags say."""
    tags = client.get_model_version(MODEL_NAME, version).tags
    return {"verdict": "unchanged", "challenger": version,
            "champion_metrics": json.loads(tags.get("gate.metrics", "null")),
            "against": f"champion's own gate ({tags.get('gate.verdict', 'none')} vs {tags.get('gate.against', '-')})",
            "criteria": json.loads(tags.get("gate.criteria", "[]")),
            "why": f"version {version} is the champion already"}


def main() -> int:
    try:
        cfg = load_registry_params()
        report = run(cfg)
    except (RegistryError, ValueError, KeyError) as exc:
        return print_error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    atomic_write_json(cfg.report_path, report)
    print(f"wrote {cfg.report_path}: {report['gate']['verdict']}, champion {report['aliases'].get('champion')}")
    if report["gate"]["verdict"] == "refused" and cfg.fail_on_refusal:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
