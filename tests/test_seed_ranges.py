"""Scene seed ranges have one home: the table at the top of params.yaml. Every held-out set's
offset (a ``seed_offset`` or ``prompt_seed`` in params.yaml, or a module constant) must be listed
there, and no two sets may start at the same seed unless the table says they share it."""

from __future__ import annotations

import re

import yaml

from conftest import REPO

# Offsets that live in code (their stage has no params key for them).
CODE_OFFSETS = {
    "training.base.VAL_SEED_OFFSET": 10_000_000,
    "training.clip.HELD_OUT_SEED_OFFSET": 30_000_000,
    "training.attributes.HELD_OUT_SEED_OFFSET": 40_000_000,
    "benchmarks.bench_metrics.SEED_OFFSET": 50_000_000,
    "monitoring.drift.drift_benchmark(heldout_seed_offset)": 70_000_000,
}
SHARED_ON_PURPOSE = {frozenset({"bench_adaptive.seed_offset", "tune_skip.holdout.seed_offset"})}


def params_offsets(params: dict) -> dict[str, int]:
    found = {}

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("seed_offset", "prompt_seed") and isinstance(value, int):
                    found[".".join((*path, key))] = value
                walk(value, (*path, str(key)))

    walk(params, ())
    return found


def table_of(text: str) -> str:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Scene seed ranges"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("#"))
    return "\n".join(lines[start:end])


def millions(value: int) -> str:
    return f"{value / 1_000_000:g}M"


def listed(value: int, table: str) -> bool:
    """``value`` appears in ``table`` in millions, not as the tail of another number ("95M" does not list 5M)."""
    return re.search(rf"(?<![\d.]){re.escape(millions(value))}", table) is not None


def test_code_offsets_are_the_modules_values():
    import importlib

    import inspect

    for name, value in CODE_OFFSETS.items():
        if name.endswith(")"):  # a function's default argument
            path, arg = name[:-1].split("(")
            module, fn = path.rsplit(".", 1)
            default = inspect.signature(getattr(importlib.import_module(module), fn)).parameters[arg].default
            assert default == value, name
        else:
            module, attr = name.rsplit(".", 1)
            assert getattr(importlib.import_module(module), attr) == value, name


def test_every_offset_is_in_the_table_and_none_is_shared_by_accident():
    text = (REPO / "params.yaml").read_text()
    table = table_of(text)
    offsets = {**params_offsets(yaml.safe_load(text)), **CODE_OFFSETS}
    assert len(offsets) >= 10
    unlisted = {k: millions(v) for k, v in offsets.items() if not listed(v, table)}
    assert not unlisted, f"seed offsets missing from params.yaml's seed-range table: {unlisted}"
    by_value: dict[int, set[str]] = {}
    for name, value in offsets.items():
        by_value.setdefault(value, set()).add(name)
    shared = [names for names in by_value.values() if len(names) > 1 and frozenset(names) not in SHARED_ON_PURPOSE]
    assert not shared, f"held-out sets starting at the same seed: {shared}"


def test_the_checks_see_a_collision_and_an_unlisted_offset():
    params = {"a": {"seed_offset": 7_000_000}, "b": {"inner": {"seed_offset": 7_000_000}}, "c": {"prompt_seed": 5}}
    assert params_offsets(params) == {"a.seed_offset": 7_000_000, "b.inner.seed_offset": 7_000_000,
                                      "c.prompt_seed": 5}
    assert millions(9_500_000) == "9.5M" and millions(95_000_000) == "95M"
    table = table_of("# Scene seed ranges\n#   95M bench_auto\nsection:\n")
    assert listed(95_000_000, table)
    assert not listed(5_000_000, table)  # "95M" does not list 5M
