"""DVC stage ``score``: every metric of ``budgetdiff.metrics`` for every rendered image, batched.

Each image of the step grid is scored against its reference (the same prompt and seed at the
reference step count): ``pixel/psnr``, ``pixel/ssim``, ``mid/lpips_*``, ``high/iclip_*``; and
against its prompt: ``high/clipt_*`` and ``domain/attr_acc`` (NaN for a prompt outside the scene
domain); ``pixel/lsnr`` needs neither. The reference images get the metrics that need no
reference (their reference-based columns are NaN: an image compared with itself says nothing).

Every shard's checksum is verified before scoring starts and again as it is read
(``budgetdiff.shards``); a corrupt or missing shard stops the stage with a one-line error that
names it. Images of several shards are scored
together in batches of ``batch_size``.

Output: ``data/scores.parquet``, one row per image: prompt_id, steps, is_reference, nfe,
seconds, then one float column per metric.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from budgetdiff.shards import ShardError, ShardStore
from pipelines.prompts import write_parquet
from pipelines.render import INDEX_FILE, read_prompts

RECORD_COLUMNS = ("prompt_id", "steps", "is_reference", "nfe", "seconds")
LEVEL_ORDER = ("pixel", "mid", "high", "domain", "dist")
# The params.yaml keys this stage needs (main() names any that are missing).
PARAMS = (
    "renders", "prompts", "clip_dir", "attributes_dir", "batch_size", "output"
)


def metric_order(name: str) -> tuple[int, str]:
    level = name.split("/", 1)[0]
    return (LEVEL_ORDER.index(level) if level in LEVEL_ORDER else len(LEVEL_ORDER), name)


def read_index(directory: str | Path) -> dict:
    path = Path(directory) / INDEX_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"score: {path} missing: the render stage has not finished (rerun it)") from None
    except ValueError as exc:
        raise ShardError(f"score: {path} is not valid JSON ({exc})") from None


def make_scorer(cfg: dict):
    import torch

    from budgetdiff.metrics import MetricScorer, ScoringConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return MetricScorer(ScoringConfig(clip_dir=cfg["clip_dir"], attributes_dir=cfg["attributes_dir"],
                                      batch_size=int(cfg["batch_size"]), device=device))


def _records(arrays: dict, steps: int, is_reference: bool) -> pd.DataFrame:
    n = len(arrays["prompt_id"])
    return pd.DataFrame({"prompt_id": arrays["prompt_id"].astype(np.int64), "steps": np.full(n, steps, np.int64),
                         "is_reference": np.full(n, is_reference), "nfe": arrays["nfe"].astype(np.int64),
                         "seconds": arrays["seconds"].astype(np.float64)})


def score_renders(cfg: dict, scorer=None, progress: bool = True) -> pd.DataFrame:
    """The per-image table of every shard listed in the render index (see module docstring)."""
    index = read_index(cfg["renders"])
    store = ShardStore(cfg["renders"])
    prompts = read_prompts(cfg["prompts"]).set_index("prompt_id")["prompt"]
    shards = index["shards"]
    for shard in shards:  # fail fast, before loading the evaluators, on a missing or corrupt shard
        store.verify(shard["name"], key=shard["key"])
    scorer = scorer or make_scorer(cfg)
    batch_size = int(cfg["batch_size"])
    bar = tqdm(total=len(shards), desc="score shards", unit="shard", disable=not progress, dynamic_ncols=True)

    # 1. References: kept in memory (one image per prompt) and scored without a reference.
    refs: dict[int, np.ndarray] = {}
    parts: list[pd.DataFrame] = []
    for shard in (s for s in shards if s["is_reference"]):
        arrays, _ = store.read(shard["name"], key=shard["key"])
        refs.update(zip(arrays["prompt_id"].tolist(), arrays["images"]))
        values = scorer.score(arrays["images"], prompts=prompts.loc[arrays["prompt_id"]].tolist())
        parts.append(_records(arrays, shard["steps"], True).assign(**values))
        bar.update(1)
    missing = sorted(set(prompts.index) - set(refs))
    if missing:
        raise ShardError(f"score: no reference image for {len(missing)} prompt(s) (first: {missing[0]})")

    # 2. The grid: shards gathered into blocks of at least batch_size images, scored together.
    block: list[tuple[dict, dict]] = []

    def flush():
        if not block:
            return
        images = np.concatenate([a["images"] for a, _ in block])
        ids = np.concatenate([a["prompt_id"] for a, _ in block])
        values = scorer.score(images, refs=np.stack([refs[i] for i in ids.tolist()]),
                              prompts=prompts.loc[ids].tolist())
        records = pd.concat([_records(a, s["steps"], False) for a, s in block], ignore_index=True)
        parts.append(records.assign(**values))
        bar.update(len(block))
        block.clear()

    for shard in (s for s in shards if not s["is_reference"]):
        arrays, _ = store.read(shard["name"], key=shard["key"])
        block.append((arrays, shard))
        if sum(len(a["prompt_id"]) for a, _ in block) >= batch_size:
            flush()
    flush()
    bar.close()

    table = pd.concat(parts, ignore_index=True)
    metrics = sorted((c for c in table.columns if c not in RECORD_COLUMNS), key=metric_order)
    table = table[list(RECORD_COLUMNS) + metrics].astype({m: "float64" for m in metrics})
    check_complete(table, set(prompts.index), [*index["step_grid"], index["reference_steps"]])
    return table.sort_values(["prompt_id", "steps"], ignore_index=True)


def check_complete(table: pd.DataFrame, prompt_ids: set[int], steps: list[int]) -> None:
    """Exactly one row per (prompt, step count): no duplicate, nothing missing."""
    dup = table.duplicated(["prompt_id", "steps"])
    if dup.any():
        row = table[dup].iloc[0]
        raise ShardError(f"score: duplicate image for prompt {row.prompt_id} at {row.steps} steps")
    expected = len(prompt_ids) * len(steps)
    if len(table) != expected or set(table["prompt_id"]) != prompt_ids or set(table["steps"]) != set(steps):
        raise ShardError(f"score: {len(table)} images, expected {expected} ({len(prompt_ids)} prompts x "
                         f"{len(steps)} step counts)")


def run(cfg: dict, scorer=None, progress: bool = True) -> pd.DataFrame:
    table = score_renders(cfg, scorer=scorer, progress=progress)
    write_parquet(table, cfg["output"])
    return table


def main() -> None:
    from training.params import load_params

    cfg = load_params("score", required=PARAMS)
    try:
        table = run(cfg)
    except (ShardError, ValueError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from None
    metrics = [c for c in table.columns if c not in RECORD_COLUMNS]
    print(f"score: {len(table)} images, {len(metrics)} metrics ({', '.join(metrics)}) -> {cfg['output']}")


if __name__ == "__main__":
    main()
