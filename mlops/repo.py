"""The repository root: where params.yaml, dvc.yaml, the tracking database and the default
output folders of the MLOps layers live."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
