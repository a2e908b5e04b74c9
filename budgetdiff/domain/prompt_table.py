"""The prompt table of the ``prompts`` stage, built from code and params alone.

One definition for the two places that need it: the ``prompts`` DVC stage writes it to
data/prompts.parquet (``pipelines/prompts.py``), and the drift monitor regenerates the budget
predictor's training prompts from it without reading that git-ignored file
(``budgetdiff.statistics.drift.reference_prompts``).

- ``scene_prompt_rows``: ``n`` distinct scene-domain prompts stratified by object count (quotas
  ``count_weights``): level k's prompts come from the seeds seed_offset + 1,000,000 k, +1, ...,
  and a seed whose prompt repeats an earlier one is passed over. The seed is also the prompt's
  generation seed.
- ``file_prompt_rows``: the valid prompts of a user's file (``budgetdiff.io.prompt_files``), seeds
  seed_offset + i; complexity is the number of objects when the prompt parses in the scene
  domain, otherwise its word-count quartile.
- ``stratified_split``: by prompt, within each complexity level shuffled (``split_seed``) and cut
  by the split fractions.
"""

from __future__ import annotations

import random
from typing import Mapping, Sequence

import numpy as np

from budgetdiff.io.prompt_files import PromptFileError, read_prompt_file
from budgetdiff.domain.scenes import MAX_OBJECTS, PromptParseError, parse_prompt, sample_scene, spec_to_prompt

SPLITS = ("train", "val", "test")
PROMPT_COLUMNS = ("prompt_id", "prompt", "seed", "complexity", "split")  # data/prompts.parquet's columns
COMPLEXITY_LEVELS = tuple(range(1, MAX_OBJECTS + 1))
LEVEL_SEED_STRIDE = 1_000_000  # level k's scenes start at seed_offset + k x this


def quotas(n: int, weights: Sequence[float]) -> list[int]:
    """Split ``n`` into integer parts proportional to ``weights`` (largest remainders)."""
    w = np.asarray(weights, dtype=float)
    if n < 0 or w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"cannot split {n} by weights {list(weights)}")
    exact = n * w / w.sum()
    parts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - parts), kind="stable")[: n - parts.sum()]:
        parts[i] += 1
    return parts.tolist()


def scene_prompt_rows(n: int, count_weights: Sequence[float], seed_offset: int) -> list[dict]:
    """Rows {prompt, seed, complexity}: ``n`` distinct scene prompts stratified by object count."""
    if len(count_weights) != len(COMPLEXITY_LEVELS):
        raise ValueError(f"prompts.count_weights: need {len(COMPLEXITY_LEVELS)} weights (1 to {MAX_OBJECTS} "
                         f"objects), got {list(count_weights)}")
    rows, seen = [], set()
    for level, quota in zip(COMPLEXITY_LEVELS, quotas(n, count_weights)):
        seed, made = int(seed_offset) + LEVEL_SEED_STRIDE * level, 0
        while made < quota:
            prompt = spec_to_prompt(sample_scene(seed, n_objects=level))
            if prompt not in seen:
                seen.add(prompt)
                rows.append({"prompt": prompt, "seed": seed, "complexity": level})
                made += 1
            seed += 1
    return rows


def file_complexity(prompts: Sequence[str]) -> list[int]:
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


def file_prompt_rows(path: str, n: int | None, seed_offset: int, max_chars: int) -> tuple[list[dict], list[str]]:
    """Rows {prompt, seed, complexity} of a user's file (the first ``n`` valid prompts when given)
    and its rejected lines; ``PromptFileError`` when no prompt is valid."""
    result = read_prompt_file(path, max_chars=max_chars)
    kept = result.prompts[:n] if n else result.prompts
    if not kept:
        raise PromptFileError(f"prompt_file: {path} has no valid prompt ({len(result.rejected)} line(s) rejected)")
    texts = [p.text for p in kept]
    rows = [{"prompt": t, "seed": int(seed_offset) + i, "complexity": c}
            for i, (t, c) in enumerate(zip(texts, file_complexity(texts)))]
    return rows, [str(r) for r in result.rejected]


def stratified_split(complexity: Sequence[int], fractions: Mapping[str, float], seed: int) -> list[str]:
    """A split name per row: within each complexity level, shuffled and cut by ``fractions``."""
    if set(fractions) != set(SPLITS) or any(v < 0 for v in fractions.values()):
        raise ValueError(f"prompts.split: need non-negative fractions for {', '.join(SPLITS)}, got {dict(fractions)}")
    complexity = list(complexity)
    split = [""] * len(complexity)
    rng = random.Random(seed)
    for level in sorted(set(complexity)):
        index = [i for i, c in enumerate(complexity) if c == level]
        rng.shuffle(index)
        names = [s for s, q in zip(SPLITS, quotas(len(index), [fractions[s] for s in SPLITS])) for _ in range(q)]
        for i, name in zip(index, names):
            split[i] = name
    return split


def prompt_rows(cfg: Mapping) -> tuple[list[dict], list[str]]:
    """The ``prompts`` section's table: rows of ``PROMPT_COLUMNS`` in the stage's order, and the
    rejected lines of a prompt file."""
    source, n = cfg.get("source", "scenes"), cfg.get("n_prompts")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"prompts.n_prompts: must be a positive integer or null, got {n!r}")
    try:
        if source == "scenes":
            if n is None:
                raise ValueError("prompts.n_prompts: the scene domain needs a number of prompts")
            rows, rejected = scene_prompt_rows(n, cfg["count_weights"], int(cfg["seed_offset"])), []
        else:
            rows, rejected = file_prompt_rows(str(source), n, int(cfg["seed_offset"]), int(cfg["max_prompt_chars"]))
        split = stratified_split([r["complexity"] for r in rows], cfg["split"], int(cfg["split_seed"]))
    except KeyError as exc:
        raise ValueError(f"params: prompts.{exc.args[0]} is missing") from None
    return [{"prompt_id": i, **row, "split": s} for i, (row, s) in enumerate(zip(rows, split))], rejected
