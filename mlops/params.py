"""params.yaml access for DVC stages: one section per stage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import yaml

PARAMS_FILE = Path("params.yaml")  # relative to the working directory (DVC runs stages at the root)


class ParamsError(ValueError):
    """params.yaml is missing, or lacks a section or a key a stage needs."""


def load_params(section: str, path: str | os.PathLike | None = None,
                required: Iterable[str] = ()) -> dict[str, Any]:
    """The ``section`` of ``path``, else of ``BUDGETDIFF_PARAMS`` (read at each call), else of
    params.yaml, as a dict. Raises ``ParamsError`` naming the missing file, section or
    ``required`` keys."""
    path = Path(path or os.environ.get("BUDGETDIFF_PARAMS") or PARAMS_FILE)
    if not path.is_file():
        raise ParamsError(f"params file {path} not found (run from the repository root)")
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict) or section not in params:
        raise ParamsError(f"params file {path} has no section {section!r}")
    cfg = params[section]
    missing = [k for k in required if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ParamsError(f"params file {path}: section {section!r} lacks {', '.join(missing)}")
    return cfg
