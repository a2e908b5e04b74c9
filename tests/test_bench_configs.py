"""The benchmark stages' typed configs: every section of params.yaml and of the tiny profile
reads into its dataclass, the closed choices match the library's, and a cache key computed from
a config is the one computed from the plain section before the configs were typed."""

import dataclasses
import importlib
import typing

import pytest
import yaml

from conftest import REPO
from mlops.params import ParamsError, config_dict, load_config
from test_workflow import merge

CONFIGS = {  # stage (= params section) -> its config class in benchmarks/<stage>.py
    "ablate_composition": "AblateCompositionConfig",
    "ablate_text_binding": "AblateTextBindingConfig",
    "bench_adaptive": "BenchAdaptiveConfig",
    "bench_auto": "BenchAutoConfig",
    "bench_base": "BenchBaseConfig",
    "bench_budget": "BenchBudgetConfig",
    "bench_distill": "BenchDistillConfig",
    "bench_metrics": "BenchMetricsConfig",
    "bench_monitor": "BenchMonitorConfig",
    "bench_render": "BenchRenderConfig",
    "bench_serve": "BenchServeConfig",
    "pilot_detail": "PilotDetailConfig",
}


def config_class(stage: str):
    return getattr(importlib.import_module(f"benchmarks.{stage}"), CONFIGS[stage])


@pytest.fixture(scope="module")
def tiny_params(tmp_path_factory):
    """params.yaml with the tiny profile merged over it, as tests/test_workflow.py runs it."""
    full = yaml.safe_load((REPO / "params.yaml").read_text())
    path = tmp_path_factory.mktemp("tiny") / "params.yaml"
    path.write_text(yaml.safe_dump(merge(full, yaml.safe_load((REPO / "params.tiny.yaml").read_text()))))
    return path


@pytest.mark.parametrize("stage", sorted(CONFIGS))
def test_each_benchmark_section_reads_into_its_config(stage, tiny_params):
    """Every key of the section (full and tiny profile) is a field and keeps its value; the
    other fields are the ones with defaults."""
    cls = config_class(stage)
    defaulted = {f.name for f in dataclasses.fields(cls)
                 if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    for path in (REPO / "params.yaml", tiny_params):
        section = yaml.safe_load(path.read_text())[stage]
        plain = config_dict(load_config(stage, cls, path))
        assert set(plain) - set(section) <= defaulted
        expected = {**section, "candidates": plain["candidates"]} if stage == "pilot_detail" else section
        assert _listed({k: plain[k] for k in section}) == _listed(expected)
    if stage == "pilot_detail":  # a candidate's unstated keys are sample_scene's defaults
        assert plain["candidates"][0] == {"n_objects": 1, "material": "plain", "strength": "", "speckle_prob": 0.0}


def _listed(value):
    """Tuples as lists, recursively (what YAML and JSON hold)."""
    if isinstance(value, dict):
        return {k: _listed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_listed(v) for v in value]
    return value


def test_an_unknown_or_mistyped_key_is_named(tmp_path):
    full = yaml.safe_load((REPO / "params.yaml").read_text())
    serve = full["bench_serve"]
    path = tmp_path / "params.yaml"
    mixed = {**serve["mixed"], "mix": {"auto": 0.5, "sdxl": 0.5}}
    path.write_text(yaml.safe_dump({"bench_serve": {**serve, "mixed": mixed}}))
    with pytest.raises(ParamsError, match=r"section 'bench_serve': mixed: mix \(key\): expected one of .*'sdxl'"):
        load_config("bench_serve", config_class("bench_serve"), path)
    path.write_text(yaml.safe_dump({"bench_auto": {**full["bench_auto"], "prompt": 3}}))
    with pytest.raises(ParamsError, match=r"section 'bench_auto': unknown key prompt"):
        load_config("bench_auto", config_class("bench_auto"), path)
    path.write_text(yaml.safe_dump({"bench_adaptive": {**full["bench_adaptive"], "schedulers": ["ddim", "pndm"]}}))
    with pytest.raises(ParamsError, match=r"schedulers\[1\]: expected one of 'ddim', 'dpmpp', 'euler', got 'pndm'"):
        load_config("bench_adaptive", config_class("bench_adaptive"), path)


def test_closed_choices_are_the_librarys():
    from budgetdiff.domain.scenes import MATERIALS, STRENGTHS
    from budgetdiff.generation.pipeline import SCHEDULERS
    from budgetdiff.methods.adaptive import REUSE_SPACES
    from pipelines.schema import SPLITS

    for stage in ("bench_adaptive", "bench_base", "bench_distill"):
        assert set(typing.get_args(importlib.import_module(f"benchmarks.{stage}").Scheduler)) == set(SCHEDULERS)
    from benchmarks import bench_adaptive, bench_budget, pilot_detail

    assert set(typing.get_args(bench_adaptive.Reuse)) == set(REUSE_SPACES)
    assert set(typing.get_args(pilot_detail.Material)) == set(MATERIALS)
    assert set(typing.get_args(pilot_detail.Strength)) == set(STRENGTHS)
    assert set(typing.get_args(typing.get_type_hints(bench_budget.BenchBudgetConfig)["split"])) == set(SPLITS)


def test_bench_distill_cache_keys_are_unchanged():
    """bench_distill keeps each (run, guidance) result under a key of the values it depends on:
    computed from the typed config it must be the key of the plain section, so the results
    cached before the config was typed are found again."""
    from benchmarks.bench_distill import BenchDistillConfig, result_key
    from budgetdiff.io.fingerprint import content_sha256

    section = yaml.safe_load((REPO / "params.yaml").read_text())["bench_distill"]
    cfg = load_config("bench_distill", BenchDistillConfig, REPO / "params.yaml")
    for guidance, pinned in ((1.0, "4d2c1efa8b73e118"), (1.25, "10c06002f670621e")):
        plain = content_sha256(["f" * 32, 8, guidance, section["scheduler"], 500, section["seed_offset"],
                                list(section["count_weights"]), section["batch_size"]])
        assert result_key("f" * 32, 8, guidance, 500, cfg) == plain == pinned
