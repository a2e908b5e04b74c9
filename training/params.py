"""params.yaml access for DVC stages: one section per stage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from budgetdiff.io import atomic_write_json as write_json  # noqa: F401  (re-exported for stages)

PARAMS_FILE = Path(os.environ.get("BUDGETDIFF_PARAMS", "params.yaml"))


def load_params(section: str, path: str | os.PathLike | None = None,
                required: Iterable[str] = ()) -> dict[str, Any]:
    """The ``section`` of params.yaml (or ``path``) as a dict; a one-line error (SystemExit)
    names any of the ``required`` keys it lacks."""
    path = Path(path or PARAMS_FILE)
    if not path.exists():
        raise SystemExit(f"error: params file {path} not found (run from the repository root)")
    params = yaml.safe_load(path.read_text()) or {}
    if section not in params:
        raise SystemExit(f"error: params file {path} has no section {section!r}")
    cfg = params[section]
    missing = [k for k in required if k not in cfg]
    if missing:
        raise SystemExit(f"error: params.yaml section {section!r} lacks {', '.join(missing)}")
    return cfg
