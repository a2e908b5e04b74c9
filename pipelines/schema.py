"""What the data stages hand each other: file names, columns, and how their tables are read and
written. A small module of its own so that each stage depends on the schema, not on the code of
the stages before it (``tests/test_dvc_deps.py``).

Every file here is written deterministically: the same inputs give the same bytes, so that a
re-run on a fresh clone hashes to what ``dvc.lock`` records. Wall-clock timings and host facts
never go into these files.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from budgetdiff.io import atomic_write_bytes

SPLITS = ("train", "val", "test")              # the prompts' splits (prompts stage)
INDEX_FILE = "index.json"                      # the render stage's plan, beside its shards
# The per-image columns of data/scores.parquet (score stage) before its metric columns.
RECORD_COLUMNS = ("prompt_id", "seed", "steps", "is_reference", "nfe")


def write_parquet(frame: pd.DataFrame, path: str | Path) -> None:
    """Write ``frame`` as Parquet, atomically (same frame, same bytes)."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


def read_prompts(path: str | Path) -> pd.DataFrame:
    """data/prompts.parquet; a ``ValueError`` names a missing file or missing columns."""
    try:
        prompts = pd.read_parquet(path)
    except FileNotFoundError:
        raise ValueError(f"render.prompts: {path} does not exist (run the prompts stage)") from None
    missing = {"prompt_id", "prompt", "seed"} - set(prompts.columns)
    if missing or prompts.empty:
        raise ValueError(f"render.prompts: {path} has no prompts or lacks columns {sorted(missing)}")
    return prompts
