"""DVC stage ``prompts``: the dataset's prompts, each with a fixed seed, split train/val/test.

Two sources, one output (``data/prompts.parquet``: prompt_id, prompt, seed, complexity, split):

- the scene domain (``source: scenes``, default): ``n_prompts`` scenes stratified by complexity
  (the number of objects, 1 to 4) with quotas ``count_weights``; prompt ``i`` of level ``k`` is
  ``spec_to_prompt(sample_scene(seed, n_objects=k))`` where ``seed`` (from ``seed_offset``, a range
  no training or benchmark stream uses) is also the prompt's generation seed. A seed whose prompt
  text repeats an earlier one is passed over.
- a user's prompt file (``source: PATH``): one prompt per line, or a CSV with a ``prompt`` column
  (COCO captions, DiffusionDB, ...). Bad lines (empty, over-long, not UTF-8, control characters,
  duplicates) are reported one per line and skipped (``budgetdiff.prompt_files``). Complexity is the
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

import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from budgetdiff.io import atomic_write_bytes, atomic_write_json
from budgetdiff.prompt_files import PromptFileError, read_prompt_file
from budgetdiff.scenes import MAX_OBJECTS, PromptParseError, parse_prompt, sample_scene, spec_to_prompt

SCENES = "scenes"
SPLITS = ("train", "val", "test")
COMPLEXITY_LEVELS = tuple(range(1, MAX_OBJECTS + 1))
PROMPT_COLUMNS = ("prompt_id", "prompt", "seed", "complexity", "split")
# The params.yaml keys this stage needs (main() names any that are missing).
PARAMS = (
    "source", "n_prompts", "count_weights", "seed_offset", "split", "split_seed",
    "max_prompt_chars", "output", "report_path"
)


def quotas(n: int, weights: list[float]) -> list[int]:
    """Split ``n`` into integer parts proportional to ``weights`` (largest remainders)."""
    w = np.asarray(weights, dtype=float)
    if n < 0 or w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"cannot split {n} by weights {weights}")
    exact = n * w / w.sum()
    parts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - parts), kind="stable")[: n - parts.sum()]:
        parts[i] += 1
    return parts.tolist()


def scene_prompts(n: int, count_weights: list[float], seed_offset: int) -> pd.DataFrame:
    """``n`` distinct scene-domain prompts stratified by object count (quotas ``count_weights``)."""
    if len(count_weights) != len(COMPLEXITY_LEVELS):
        raise ValueError(f"prompts.count_weights: need {len(COMPLEXITY_LEVELS)} weights (1 to "
                         f"{MAX_OBJECTS} objects), got {count_weights}")
    rows, seen = [], set()
    for level, quota in zip(COMPLEXITY_LEVELS, quotas(n, count_weights)):
        seed, made = seed_offset + 1_000_000 * level, 0
        while made < quota:
            prompt = spec_to_prompt(sample_scene(seed, n_objects=level))
            if prompt not in seen:
                seen.add(prompt)
                rows.append({"prompt": prompt, "seed": seed, "complexity": level})
                made += 1
            seed += 1
    return pd.DataFrame(rows)


def file_complexity(prompts: list[str]) -> list[int]:
    """Objects in the scene domain for prompts that parse there, else the word-count quartile."""
    words = np.array([len(p.split()) for p in prompts], dtype=float)
    cuts = np.quantile(words, [0.25, 0.5, 0.75]) if len(words) else []
    out = []
    for prompt, w in zip(prompts, words):
        try:
            out.append(parse_prompt(prompt).complexity)
        except PromptParseError:
            out.append(1 + int(np.searchsorted(cuts, w, side="left")))
    return out


def file_prompts(path: str, n: int | None, seed_offset: int, max_chars: int) -> tuple[pd.DataFrame, list[str]]:
    """The valid prompts of a user's file (the first ``n`` when given) and the rejected lines."""
    result = read_prompt_file(path, max_chars=max_chars)
    kept = result.prompts[:n] if n else result.prompts
    if not kept:
        raise PromptFileError(f"prompt_file: {path} has no valid prompt ({len(result.rejected)} line(s) rejected)")
    texts = [p.text for p in kept]
    frame = pd.DataFrame({"prompt": texts, "seed": [seed_offset + i for i in range(len(texts))],
                          "complexity": file_complexity(texts), "line": [p.line for p in kept]})
    return frame, [str(r) for r in result.rejected]


def stratified_split(complexity: pd.Series, fractions: dict[str, float], seed: int) -> list[str]:
    """A split name per row: within each complexity level, shuffled and cut by ``fractions``."""
    if set(fractions) != set(SPLITS) or any(v < 0 for v in fractions.values()):
        raise ValueError(f"prompts.split: need non-negative fractions for {', '.join(SPLITS)}, got {fractions}")
    split = [""] * len(complexity)
    rng = random.Random(seed)
    for level in sorted(complexity.unique()):
        index = [i for i, c in enumerate(complexity) if c == level]
        rng.shuffle(index)
        names = [s for s, q in zip(SPLITS, quotas(len(index), [fractions[s] for s in SPLITS])) for _ in range(q)]
        for i, name in zip(index, names):
            split[i] = name
    return split


def build_prompts(cfg: dict) -> tuple[pd.DataFrame, list[str]]:
    """The prompt table (columns ``PROMPT_COLUMNS``) and the rejected lines of a prompt file."""
    source = cfg.get("source", SCENES)
    n = cfg.get("n_prompts")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"prompts.n_prompts: must be a positive integer or null, got {n!r}")
    if source == SCENES:
        if n is None:
            raise ValueError("prompts.n_prompts: the scene domain needs a number of prompts")
        frame, rejected = scene_prompts(n, cfg["count_weights"], int(cfg["seed_offset"])), []
    else:
        frame, rejected = file_prompts(str(source), n, int(cfg["seed_offset"]), int(cfg["max_prompt_chars"]))
    frame["split"] = stratified_split(frame["complexity"], cfg["split"], int(cfg["split_seed"]))
    frame.insert(0, "prompt_id", np.arange(len(frame), dtype=np.int64))
    frame = frame.astype({"seed": "int64", "complexity": "int64"})
    return frame[list(PROMPT_COLUMNS)], rejected


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


def write_parquet(frame: pd.DataFrame, path: str | Path) -> None:
    """Write ``frame`` as Parquet atomically."""
    import io

    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


def run(cfg: dict) -> dict:
    frame, rejected = build_prompts(cfg)
    for line in rejected:
        print(f"skipped {line}", file=sys.stderr)
    write_parquet(frame, cfg["output"])
    report = summary(frame, str(cfg.get("source", SCENES)), rejected)
    atomic_write_json(cfg["report_path"], report)
    return report


def main() -> None:
    from training.params import load_params

    cfg = load_params("prompts", required=PARAMS)
    try:
        report = run(cfg)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"prompts: {report['prompts']} ({', '.join(f'{k} {v}' for k, v in report['per_split'].items())}; "
          f"per complexity {report['per_complexity']}; {len(report['rejected_lines'])} line(s) rejected) "
          f"-> {cfg['output']}")


if __name__ == "__main__":
    main()
