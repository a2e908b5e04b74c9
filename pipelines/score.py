"""DVC stage ``score``: every metric of ``budgetdiff.metrics`` for every rendered image, batched.

Each image of the step grid is scored against its reference (the same prompt and seed at the
reference step count; with several seeds per prompt, ``render.seeds_per_prompt``, each seed has
its own reference): ``pixel/psnr``, ``pixel/ssim``, ``mid/lpips_*``, ``high/iclip_*``; and
against its prompt: ``high/clipt_*`` and ``domain/attr_acc`` (over the attributes the prompt
states; NaN for a prompt the scene parser cannot read); ``pixel/lsnr`` needs neither. The reference images get the metrics that need no
reference (their reference-based columns are NaN: an image compared with itself says nothing).

Every shard's checksum is verified before scoring starts and again as it is read
(``budgetdiff.io.shards``); a corrupt or missing shard stops the stage with a one-line error that
names it. Images of several shards are scored
together in batches of ``batch_size``.

Output: ``data/scores.parquet``, one row per image: ``pipelines.schema.RECORD_COLUMNS`` (prompt_id,
seed, steps, is_reference, nfe), then one float column per metric. No wall-clock column: the
table is deterministic (``benchmarks/bench_render.py`` measures render speed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from budgetdiff.io.shards import ShardError, ShardStore
from mlops.cli import command
from pipelines.schema import INDEX_FILE, RECORD_COLUMNS, read_prompts, write_parquet

LEVEL_ORDER = ("pixel", "mid", "high", "domain", "dist")


@dataclass(frozen=True)
class ScoreConfig:
    """params.yaml ``score``."""

    renders: str
    prompts: str
    clip_dir: str
    attributes_dir: str
    batch_size: int
    output: str


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


def make_scorer(cfg: ScoreConfig):
    import torch

    from budgetdiff.metrics import MetricScorer, ScoringConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return MetricScorer(ScoringConfig(clip_dir=cfg.clip_dir, attributes_dir=cfg.attributes_dir,
                                      batch_size=cfg.batch_size, device=device))


def shard_seeds(shard: dict, arrays: dict) -> np.ndarray:
    """The seed of every image of ``shard`` (an index entry), aligned with its arrays."""
    if "seeds" not in shard:
        raise ShardError(f"score: the render index lists no seeds for shard {shard['name']} (rerun the render stage)")
    seeds = np.asarray(shard["seeds"], dtype=np.int64)
    if len(seeds) != len(arrays["prompt_id"]):
        raise ShardError(f"score: shard {shard['name']} holds {len(arrays['prompt_id'])} images, its index entry "
                         f"{len(seeds)} seeds")
    return seeds


def _records(arrays: dict, seeds: np.ndarray, steps: int, is_reference: bool) -> pd.DataFrame:
    n = len(arrays["prompt_id"])
    return pd.DataFrame({"prompt_id": arrays["prompt_id"].astype(np.int64), "seed": seeds,
                         "steps": np.full(n, steps, np.int64),
                         "is_reference": np.full(n, is_reference), "nfe": arrays["nfe"].astype(np.int64)})


def score_renders(cfg: ScoreConfig, scorer=None, progress: bool = True) -> pd.DataFrame:
    """The per-image table of every shard listed in the render index (see module docstring)."""
    index = read_index(cfg.renders)
    store = ShardStore(cfg.renders)
    prompts = read_prompts(cfg.prompts).set_index("prompt_id")["prompt"]
    shards = index["shards"]
    for shard in shards:  # fail fast, before loading the evaluators, on a missing or corrupt shard
        store.verify(shard["name"], key=shard["key"])
    scorer = scorer or make_scorer(cfg)
    batch_size = cfg.batch_size
    bar = tqdm(total=len(shards), desc="score shards", unit="shard", disable=not progress, dynamic_ncols=True)

    # 1. References: kept in memory (one image per prompt and seed) and scored without a reference.
    refs: dict[tuple[int, int], np.ndarray] = {}
    parts: list[pd.DataFrame] = []
    for shard in (s for s in shards if s["is_reference"]):
        arrays, _ = store.read(shard["name"], key=shard["key"])
        seeds = shard_seeds(shard, arrays)
        refs.update(zip(zip(arrays["prompt_id"].tolist(), seeds.tolist()), arrays["images"]))
        values = scorer.score(arrays["images"], prompts=prompts.loc[arrays["prompt_id"]].tolist())
        parts.append(_records(arrays, seeds, shard["steps"], True).assign(**values))
        bar.update(1)
    missing = sorted(set(prompts.index) - {pid for pid, _ in refs})
    if missing:
        raise ShardError(f"score: no reference image for {len(missing)} prompt(s) (first: {missing[0]})")

    # 2. The grid: shards gathered into blocks of at least batch_size images, scored together.
    block: list[tuple[dict, dict, np.ndarray]] = []

    def flush():
        if not block:
            return
        images = np.concatenate([a["images"] for a, _, _ in block])
        ids = np.concatenate([a["prompt_id"] for a, _, _ in block])
        seeds = np.concatenate([sd for _, _, sd in block])
        keys = list(zip(ids.tolist(), seeds.tolist()))
        lost = [k for k in keys if k not in refs]
        if lost:
            raise ShardError(f"score: no reference image for prompt {lost[0][0]} with seed {lost[0][1]}")
        values = scorer.score(images, refs=np.stack([refs[k] for k in keys]), prompts=prompts.loc[ids].tolist())
        records = pd.concat([_records(a, sd, s["steps"], False) for a, s, sd in block], ignore_index=True)
        parts.append(records.assign(**values))
        bar.update(len(block))
        block.clear()

    for shard in (s for s in shards if not s["is_reference"]):
        arrays, _ = store.read(shard["name"], key=shard["key"])
        block.append((arrays, shard, shard_seeds(shard, arrays)))
        if sum(len(a["prompt_id"]) for a, _, _ in block) >= batch_size:
            flush()
    flush()
    bar.close()

    table = pd.concat(parts, ignore_index=True)
    metrics = sorted((c for c in table.columns if c not in RECORD_COLUMNS), key=metric_order)
    table = table[list(RECORD_COLUMNS) + metrics].astype({m: "float64" for m in metrics})
    check_complete(table, set(prompts.index), [*index["step_grid"], index["reference_steps"]],
                   int(index.get("seeds_per_prompt", 1)))
    return table.sort_values(["prompt_id", "seed", "steps"], ignore_index=True)


def check_complete(table: pd.DataFrame, prompt_ids: set[int], steps: list[int], seeds_per_prompt: int = 1) -> None:
    """Exactly one row per (prompt, seed, step count), ``seeds_per_prompt`` seeds for every prompt:
    no duplicate, nothing missing."""
    dup = table.duplicated(["prompt_id", "seed", "steps"])
    if dup.any():
        row = table[dup].iloc[0]
        raise ShardError(f"score: duplicate image for prompt {row.prompt_id} with seed {row.seed} at {row.steps} steps")
    expected = len(prompt_ids) * seeds_per_prompt * len(steps)
    seeds = table.groupby("prompt_id")["seed"].nunique()
    if (len(table) != expected or set(table["prompt_id"]) != prompt_ids or set(table["steps"]) != set(steps)
            or (seeds != seeds_per_prompt).any()):
        raise ShardError(f"score: {len(table)} images, expected {expected} ({len(prompt_ids)} prompts x "
                         f"{seeds_per_prompt} seed(s) x {len(steps)} step counts)")


def run(cfg: ScoreConfig, scorer=None, progress: bool = True) -> pd.DataFrame:
    table = score_renders(cfg, scorer=scorer, progress=progress)
    write_parquet(table, cfg.output)
    return table


@command(also=(ShardError,))
def main() -> None:
    from mlops.params import load_config

    cfg = load_config("score", ScoreConfig)
    table = run(cfg)
    metrics = [c for c in table.columns if c not in RECORD_COLUMNS]
    print(f"score: {len(table)} images, {len(metrics)} metrics ({', '.join(metrics)}) -> {cfg.output}")


if __name__ == "__main__":
    main()
