"""MLflow tracking shared by the training and benchmark stages.

Tracking URI: ``MLFLOW_TRACKING_URI``, default ``sqlite:///mlflow.db`` at the repository root.
Every run is tagged with the git commit and the DVC stage that produced it.
"""

from __future__ import annotations

import os
import subprocess

from .repo import REPO_ROOT

EXPERIMENT = "budgetdiff"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set (and not empty), else the repository's sqlite database."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_tags(stage: str) -> dict[str, str]:
    return {"git_commit": git_commit(), "dvc_stage": stage}


def mlflow_logger(stage: str, run_name: str | None = None):
    """A Lightning MLFlowLogger on the project's tracking URI, tagged with commit and stage."""
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(experiment_name=EXPERIMENT, run_name=run_name or stage,
                        tracking_uri=tracking_uri(), tags=run_tags(stage))
