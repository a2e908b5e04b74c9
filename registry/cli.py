"""``budgetdiff-registry`` / ``python -m registry``: register | promote | rollback | list | generate | fetch.

Errors are one line (``error: ...``, exit 2); a refused promotion prints the gate's table with
the failing metrics and exits 1. The last stdout line of register / promote / rollback is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlops.cli import ArgumentParser, print_error

from . import CHAMPION, MODEL_NAME, RegistryError


@dataclass(frozen=True)
class RegistryConfig:
    """params.yaml's ``registry`` section."""

    bundle: str
    reports: list[str]
    # The promotion gate's settings, passed as they are to ``registry.promote.promote`` (the gate
    # reads and checks them: registry/gate.py).
    gate: dict[str, Any]
    report_path: str = "reports/registry.json"
    fail_on_refusal: bool = False


def load_registry_params(path: str | os.PathLike | None = None) -> RegistryConfig:
    """params.yaml's ``registry`` section (``BUDGETDIFF_PARAMS`` or ``path``)."""
    from mlops.params import ParamsError, load_config

    try:
        return load_config("registry", RegistryConfig, path)
    except ParamsError as exc:
        raise RegistryError(f"params: {exc}") from None


def _print_json(obj) -> None:
    print(json.dumps(obj, sort_keys=True, default=str))


def cmd_register(args) -> int:
    from .store import register

    cfg = load_registry_params(args.params)
    bundle = args.bundle or cfg.bundle
    result = register(bundle, cfg.reports)
    if result["registered"]:
        print(f"registered {MODEL_NAME} version {result['version']} (bundle {result['bundle_sha256'][:12]}) "
              "with alias challenger")
    else:
        print(f"nothing registered: {result['why']}")
    _print_json(result)
    return 0


def cmd_promote(args) -> int:
    from .promote import format_gate, promote

    cfg = load_registry_params(args.params)
    result = promote(cfg.gate, version=args.version, log=lambda m: print(m, file=sys.stderr))
    print(format_gate(result))
    _print_json({k: result.get(k) for k in ("verdict", "challenger", "champion", "failed", "run_id")})
    return 1 if result["verdict"] == "refused" else 0


def cmd_rollback(args) -> int:
    from .store import connect, rollback

    result = rollback(connect())
    print(f"champion: version {result['previous']} -> version {result['champion']}")
    _print_json(result)
    return 0


def format_criteria(criteria: list[dict], indent: str = "  ") -> list[str]:
    """One line per criterion of a ``gate.criteria`` tag: name, kind, value, bound, pass / FAIL."""
    return [f"{indent}{c['metric']:<24} {c['kind']:<13} {c['value']:>10.4f} {c['bound']:<14} "
            f"{'pass' if c['passed'] else 'FAIL'}" for c in criteria]


def cmd_list(args) -> int:
    from mlops.tracking import tracking_uri

    from .store import champion_history, connect, describe_versions

    client = connect()
    rows = describe_versions(client)
    if args.json:
        _print_json({"versions": rows, "champion_history": champion_history(client)})
        return 0
    print(f"{MODEL_NAME} on {tracking_uri()}")
    if not rows:
        print("  no versions")
        return 0
    print(f"  {'ver':>4} {'aliases':<22} {'created':<17} {'bundle':<13} {'commit':<11} gate")
    for r in rows:
        gate = r["gate"] + (f" vs {r['gate_against']}" if r["gate_against"] else "")
        if r["gate_failed"] not in ("", "none"):
            gate += f" (failed: {r['gate_failed']})"
        print(f"  {r['version']:>4} {','.join(r['aliases']) or '-':<22} {r['created']:<17} {r['bundle_sha256']:<13} "
              f"{r['git_commit']:<11} {gate}")
        for line in format_criteria(r["gate_criteria"], indent=" " * 8):
            print(line)
    return 0


def cmd_generate(args) -> int:
    """Generate from a registered version in this process: ``models:/budgetdiff@ALIAS`` alone."""
    import mlflow
    import pandas as pd

    from .store import connect

    connect()
    uri = f"models:/{MODEL_NAME}/{args.version}" if args.version else f"models:/{MODEL_NAME}@{args.alias}"
    try:
        model = mlflow.pyfunc.load_model(uri)
    except RegistryError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; the user gets one line
        raise RegistryError(f"{uri}: {_first_line(exc)}") from None
    frame = pd.DataFrame({"prompt": [args.prompt], "seed": [args.seed], "mode": [args.mode]})
    out = model.predict(frame, params={"output": "png"})
    Path(args.out).write_bytes(out["image"][0])
    record = json.loads(out["record"][0])
    print(f"wrote {args.out}")
    _print_json({"model_uri": uri, "out": args.out, "steps": record.get("steps"), "nfe": record.get("nfe"),
                 "mode": record.get("mode"), "model": record.get("model", {}).get("name"), "seed": args.seed})
    return 0


def cmd_fetch(args) -> int:
    """Write a version's bundle to a directory, verified (``registry.resolve.fetch``): the container
    entrypoint's first step. Skipped when the directory already holds that version."""
    from .resolve import fetch

    # no MLflow progress bars (a pod's log, and errors stay one line) unless asked for
    bar = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(bar)
    os.environ[bar] = before if before is not None else "false"
    try:
        result = fetch(args.uri, args.out, args.cache)
    finally:
        if before is None:
            os.environ.pop(bar, None)
    what = "fetched" if result["fetched"] else "already in place:"
    print(f"{what} {result['uri']} = version {result['version']} -> {result['bundle_dir']}", file=sys.stderr)
    _print_json(result)
    return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="budgetdiff-registry", description="The MLflow model registry of budgetdiff bundles.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    r = sub.add_parser("register", help="log the bundle as a new version with alias challenger")
    r.add_argument("--bundle", help="bundle directory (default: params registry.bundle)")
    r.add_argument("--params", help="params file (default: params.yaml)")
    r.set_defaults(fn=cmd_register)
    g = sub.add_parser("promote", help="run the gate: challenger vs champion; move champion if it passes")
    g.add_argument("--version", help="judge this version instead of the challenger")
    g.add_argument("--params", help="params file (default: params.yaml)")
    g.set_defaults(fn=cmd_promote)
    b = sub.add_parser("rollback", help="move champion back to the previous champion")
    b.set_defaults(fn=cmd_rollback)
    lst = sub.add_parser("list", help="versions, aliases and gate verdicts (per criterion)")
    lst.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    lst.set_defaults(fn=cmd_list)
    gen = sub.add_parser("generate", help="generate one image from models:/budgetdiff@ALIAS")
    gen.add_argument("prompt")
    gen.add_argument("--alias", default=CHAMPION)
    gen.add_argument("--version")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--mode", default="auto")
    gen.add_argument("--out", default="registry_sample.png")
    gen.set_defaults(fn=cmd_generate)
    f = sub.add_parser("fetch", help="write a version's bundle to a directory, verified against its manifest")
    f.add_argument("uri", nargs="?", default=f"models:/{MODEL_NAME}@{CHAMPION}",
                   help="models:/NAME@ALIAS or models:/NAME/VERSION (default: the champion)")
    f.add_argument("--out", default="models/registry",
                   help="the bundle directory to (re)place (default: models/registry)")
    f.add_argument("--cache", default=None, help="cache of referenced parts (default: BUDGETDIFF_REGISTRY_CACHE "
                   "or ~/.cache/budgetdiff/registry)")
    f.set_defaults(fn=cmd_fetch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (RegistryError, ValueError, KeyError) as exc:
        return print_error(_first_line(exc))
    except Exception as exc:  # noqa: BLE001 - MLflow / server failures: one line, not a traceback
        from mlflow.exceptions import MlflowException

        if isinstance(exc, MlflowException) or isinstance(exc, OSError):
            return print_error(f"{type(exc).__name__}: {_first_line(exc)}")
        raise


def _entry() -> None:
    raise SystemExit(main())
