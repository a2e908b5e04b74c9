"""The training stages' typed configs (training/*.py): every section of params.yaml and of the
tiny CI profile reads into its dataclass, and the checkpoint keys computed from a config are the
keys the stages computed when they read their sections as dicts (checkpoints on disk stay valid)."""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO
from budgetdiff.io.fingerprint import content_sha256


def merged(base: dict, override: dict) -> dict:
    """params.tiny.yaml over params.yaml: mappings merged key by key, the rest replaced (as
    tests/test_workflow.py builds the CI profile)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


@pytest.fixture(params=["params.yaml", "params.tiny.yaml"])
def profile(request, tmp_path):
    """(params file path, its sections): the full profile, or the tiny one merged over it."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if request.param == "params.yaml":
        return REPO / "params.yaml", params
    params = merged(params, yaml.safe_load((REPO / "params.tiny.yaml").read_text()))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path, params


def test_train_base_v2_checkpoint_key_is_pinned():
    """models/base_v2_training/<key>/ holds the long version-2 run's checkpoints: its key must not move."""
    from training.base import config_hash, stage_config

    assert config_hash(stage_config("train_base_v2", REPO / "params.yaml")) == "e3d9b5677904"
    assert (REPO / "models/base_v2_training/e3d9b5677904").is_dir()


def test_every_training_section_reads_into_its_config(profile):
    from mlops.params import load_config
    from training.attributes import TrainAttributesConfig
    from training.base import STAGES, stage_config
    from training.budget import TrainBudgetConfig
    from training.clip import TrainClipConfig
    from training.distill import stage_config as distill_config
    from registry.cli import RegistryConfig
    from training.tune_skip.params import TuneSkipConfig

    path, params = profile
    assert load_config("train_clip", TrainClipConfig, path).vision.patch_size == params["train_clip"]["vision"]["patch_size"]
    assert load_config("train_attributes", TrainAttributesConfig, path).channels == params["train_attributes"]["channels"]
    for stage in STAGES:
        cfg = stage_config(stage, path)
        assert cfg.stage == stage and cfg.max_steps == params.get(stage, {}).get("max_steps", params["train_base"]["max_steps"])
    assert stage_config("train_base_v2", path).unet.pooled_text is False
    assert stage_config("train_base", path).unet.pooled_text is True
    budget = load_config("train_budget", TrainBudgetConfig, path)
    assert budget.calibrate_epsilon.full_steps == params["train_budget"]["calibrate_epsilon"]["full_steps"]
    assert distill_config("distill_16", path=path).stage == "distill_16"
    for variant in params["distill_8_variants"]:
        assert distill_config("distill_8", variant, path).output_dir == params["distill_8_variants"][variant]["output_dir"]
    tune = load_config("tune_skip", TuneSkipConfig, path)
    assert tune.schedulers == params["tune_skip"]["schedulers"] and tune.search_space.warmup_min >= 4
    assert load_config("registry", RegistryConfig, path).gate == params["registry"]["gate"]


def test_tune_skip_checkpoint_key_is_the_key_of_the_section_as_a_dict():
    """tune_skip's phases are checkpointed under work_dir/<run_key>: the typed section, as plain
    data, keys them as the dict did."""
    from mlops.params import config_dict, load_config
    from training.tune_skip.checkpoints import REFERENCE_KEYS, run_key
    from training.tune_skip.params import TuneSkipConfig

    section = yaml.safe_load((REPO / "params.yaml").read_text())["tune_skip"]
    typed = config_dict(load_config("tune_skip", TuneSkipConfig, REPO / "params.yaml"))
    assert run_key(typed) == run_key(section) and run_key(typed, REFERENCE_KEYS) == run_key(section, REFERENCE_KEYS)
    assert typed["selection"] == section["selection"] and typed["baseline"] == section["baseline"]


def test_checkpoint_keys_are_the_keys_of_the_sections_as_dicts(profile):
    """train_base / finetune_base / train_base_v2 and every distillation run: the key is computed
    from the same plain data as when the stages merged their sections into a dict."""
    from pathlib import Path

    from training import base, distill

    path, params = profile
    for stage in base.STAGES:
        section = {**params["train_base"], **(params[stage] if stage != "train_base" else {}), "stage": stage}
        old = content_sha256({k: v for k, v in section.items() if k not in base.POST_TRAINING_KEYS}, 12)
        assert base.config_hash(base.stage_config(stage, path)) == old, stage
    runs = [("distill_16", None)] + [("distill_8", v) for v in params["distill_8_variants"]]
    for stage, variant in runs:
        section = {**params["distill"], **params[stage], **(params[f"{stage}_variants"][variant] if variant else {})}
        name = f"{stage}@{variant}" if variant else stage
        section.update(checkpoint_dir=str(Path(section["checkpoint_dir"]) / name.replace("@", "_")), stage=name)
        old = {k: v for k, v in section.items() if k not in distill.POST_TRAINING_KEYS}
        assert content_sha256(distill.training_config(distill.stage_config(stage, variant, path))) == \
            content_sha256(old), name


def test_a_bad_key_is_named_before_training(tmp_path):
    from mlops.params import ParamsError
    from training.base import stage_config

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["finetune_base"]["lr_warmup_step"] = 10
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"section 'train_base' \+ 'finetune_base': unknown key lr_warmup_step"):
        stage_config("finetune_base", tmp_path / "params.yaml")
    params["finetune_base"] = {"lr": "fast"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"lr: expected a number, got 'fast'"):
        stage_config("finetune_base", tmp_path / "params.yaml")
