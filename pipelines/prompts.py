"""DVC stage ``prompts``: the dataset's prompts, each with a fixed seed, split train/val/test.

Two sources, one output (``data/prompts.parquet``: prompt_id, prompt, seed, complexity, split):

- the scene domain (``source: scenes``, default): ``n_prompts`` scenes stratified by complexity
  (the number of objects, 1 to 4) with quotas ``count_weights``; prompt ``i`` of level ``k`` is
  ``spec_to_prompt(sample_scene(seed, n_objects=k))`` where ``seed`` (from ``seed_offset``, a range
  no training or benchmark stream uses) is also the prompt's generation seed. A seed whose prompt
  text repeats an earlier one is passed over.
- a user's prompt file (``source: PATH``): one prompt per line, or a CSV with a ``prompt`` column
  (COCO captions, DiffusionDB, ...). Bad lines (empty, over-long, not UTF-8, control characters,
  duplicates) are reported one per line and skipped (``budgetdiff.io.prompt_files``). Complexity is the
  number of objects when a prompt parses in the scene domain, otherwise its word-count quartile
  (1 = shortest quarter ... 4 = longest). Seeds are ``seed_offset + i``. ``n_prompts`` keeps the
  first n valid prompts (null: all). Add the file to this stage's deps in dvc.yaml so that DVC
  reruns the stage when it changes.

The split is by prompt and stratified by complexity: within each level the prompts are shuffled
(``split_seed``) and cut by the ``split`` fractions, so every level appears in every split in the
same proportions and no prompt's images appear in two splits.

Also writes ``data/prompts_report.json``: counts per split and level, and the rejected lines.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import pandas as pd

from budgetdiff.io import atomic_write_json
from budgetdiff.domain.prompt_table import PROMPT_COLUMNS, prompt_rows
from mlops.cli import command
from mlops.params import config_dict
from pipelines.schema import SPLITS, write_parquet


@dataclass(frozen=True)
class SplitFractions:
    """Fractions of each complexity level's prompts per split."""

    train: float
    val: float
    test: float


@dataclass(frozen=True)
class PromptsConfig:
    """params.yaml ``prompts``."""

    source: str
    n_prompts: Optional[int]
    count_weights: list[float]
    seed_offset: int
    split: SplitFractions
    split_seed: int
    max_prompt_chars: int
    output: str
    report_path: str


def build_prompts(cfg: PromptsConfig) -> tuple[pd.DataFrame, list[str]]:
    """The prompt table (columns ``PROMPT_COLUMNS``) and the rejected lines of a prompt file
    (``budgetdiff.domain.prompt_table``, which the drift monitor regenerates too from the raw
    section: both read the same plain data)."""
    rows, rejected = prompt_rows(config_dict(cfg))
    frame = pd.DataFrame(rows, columns=list(PROMPT_COLUMNS))
    frame = frame.astype({"prompt_id": "int64", "seed": "int64", "complexity": "int64"})
    return frame, rejected


def summary(frame: pd.DataFrame, source: str, rejected: list[str]) -> dict:
    counts = Counter(zip(frame["split"], frame["complexity"]))
    return {
        "source": source,
        "prompts": int(len(frame)),
        "per_split": {s: int((frame["split"] == s).sum()) for s in SPLITS},
        "per_complexity": {str(k): int(v) for k, v in sorted(Counter(frame["complexity"]).items())},
        "per_split_and_complexity": {s: {str(k): int(counts[(s, k)]) for k in sorted(frame["complexity"].unique())}
                                     for s in SPLITS},
        "rejected_lines": rejected,
    }


def run(cfg: PromptsConfig) -> dict:
    frame, rejected = build_prompts(cfg)
    for line in rejected:
        print(f"skipped {line}", file=sys.stderr)
    write_parquet(frame, cfg.output)
    report = summary(frame, cfg.source, rejected)
    atomic_write_json(cfg.report_path, report)
    return report


@command
def main() -> None:
    from mlops.params import load_config

    cfg = load_config("prompts", PromptsConfig)
    report = run(cfg)
    print(f"prompts: {report['prompts']} ({', '.join(f'{k} {v}' for k, v in report['per_split'].items())}; "
          f"per complexity {report['per_complexity']}; {len(report['rejected_lines'])} line(s) rejected) "
          f"-> {cfg.output}")


if __name__ == "__main__":
    main()
