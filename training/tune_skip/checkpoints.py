"""Every phase of the stage is checkpointed under ``work_dir``, keyed by the params it depends
on, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

from budgetdiff.io.fingerprint import content_sha256

REFERENCE_KEYS = ("model", "steps", "guidance", "prompts_per_level", "seed_offset", "clip_dir", "baseline")


def run_key(cfg: dict, keys: tuple = REFERENCE_KEYS + ("search_space", "num_samples", "seed", "warm_start",
                                                       "optuna_startup_trials", "max_concurrent")) -> str:
    """What a checkpoint is valid for: everything that changes its result (the references and
    the held-out checks depend on ``REFERENCE_KEYS`` only; the searches on more)."""
    return content_sha256({k: cfg.get(k) for k in keys}, 12)


class Checkpoints:
    """Per-phase JSON files under ``work_dir/<key>/`` (written atomically)."""

    def __init__(self, work_dir: str, key: str):
        self.dir = Path(work_dir) / key
        self.dir.mkdir(parents=True, exist_ok=True)

    def get(self, name: str):
        path = self.dir / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, name: str, obj) -> None:
        from budgetdiff.io import atomic_write_json

        atomic_write_json(self.dir / f"{name}.json", obj)
