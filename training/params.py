"""params.yaml access for DVC stages: one section per stage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from budgetdiff.io import atomic_write_json as write_json  # noqa: F401  (re-exported for stages)

PARAMS_FILE = Path(os.environ.get("BUDGETDIFF_PARAMS", "params.yaml"))


def load_params(section: str, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``section`` of params.yaml (or ``path``) as a dict."""
    path = Path(path or PARAMS_FILE)
    if not path.exists():
        raise SystemExit(f"error: params file {path} not found (run from the repository root)")
    params = yaml.safe_load(path.read_text()) or {}
    if section not in params:
        raise SystemExit(f"error: params file {path} has no section {section!r}")
    return params[section]
