"""budgetdiff.io.fingerprint: one hash per idea, and the values stored with the models still hold."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from budgetdiff.io.fingerprint import (FingerprintError, content_sha256, directory_fingerprint, file_sha256,
                                    unet_fingerprint)

from conftest import REPO


def test_unet_fingerprint_is_the_value_the_budget_predictor_stored():
    """models/budget/config.json records the base model's UNet fingerprint; the engine refuses
    a predictor whose value differs, so the one helper must reproduce it."""
    stored = json.loads((REPO / "models" / "budget" / "config.json").read_text())["model"]
    assert unet_fingerprint(REPO / stored["path"]) == stored["unet_sha256"]


def _old_budget_fingerprint(model_dir: Path) -> str:  # budgetdiff.methods.budget.model_fingerprint before the merge
    digest = hashlib.sha256()
    for path in sorted(p for p in (model_dir / "unet").glob("*") if p.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def test_unet_fingerprint_follows_the_unet_files_only(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = unet_fingerprint(model)
    assert len(before) == 16 and before == _old_budget_fingerprint(model)
    (model / "scheduler" / "scheduler_config.json").write_text("{}")  # not the UNet: same fingerprint
    assert unet_fingerprint(model) == before
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\1")
    assert unet_fingerprint(model) != before
    shutil.rmtree(model / "unet")
    with pytest.raises(FingerprintError, match="has no unet/ files to fingerprint"):
        unet_fingerprint(model)


def test_directory_fingerprint_covers_names_and_bytes_recursively(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.bin").write_bytes(b"1")
    first = directory_fingerprint(tmp_path / "a")
    assert first == directory_fingerprint(tmp_path / "a")
    (tmp_path / "a" / "b" / "x.bin").rename(tmp_path / "a" / "b" / "y.bin")
    renamed = directory_fingerprint(tmp_path / "a")
    (tmp_path / "a" / "b" / "y.bin").write_bytes(b"2")
    assert len({first, renamed, directory_fingerprint(tmp_path / "a")}) == 3


def test_content_sha256_is_each_former_key():
    """The seven sha256-of-JSON helpers it replaced (cache keys, checkpoint keys, policy and bundle
    ids), as they were written: sorted or not, ``default=str`` or not, 8 to 64 hex digits. Their
    inputs hold no dicts where the keys were not sorted, so every key keeps its value."""
    cfg = {"model": "/m", "steps": 12, "space": {"b": [1, 2], "a": 0.5}, "seed": None}
    listed = [["abc", "def"], "auto", ["a red circle", "a blue square"], [3, 4], 16, 1.25]

    def sha(blob: str) -> str:
        return hashlib.sha256(blob.encode()).hexdigest()

    assert content_sha256(cfg, 12) == sha(json.dumps(cfg, sort_keys=True))[:12]  # training checkpoints
    assert content_sha256(cfg, 12) == sha(json.dumps(cfg, sort_keys=True, default=str))[:12]  # tune_skip
    assert content_sha256(cfg) == sha(json.dumps(cfg, sort_keys=True))[:16]  # policies, bundles
    assert content_sha256(cfg, None) == sha(json.dumps(cfg, sort_keys=True))  # registry bundle_sha256
    assert content_sha256(listed) == sha(json.dumps(listed))[:16]  # bench/calibrate/gate caches
    assert content_sha256({"configs": cfg, "confirm": cfg}, 8) == sha(
        json.dumps({"configs": cfg, "confirm": cfg}, sort_keys=True, default=str))[:8]
    assert content_sha256([Path("/x")]) == sha(json.dumps([Path("/x")], default=str))[:16]
    assert content_sha256({"a": 1, "b": 2}) == content_sha256({"b": 2, "a": 1})


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"\0" * (1 << 23) + b"tail")  # more than one read block
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path, 16) == file_sha256(path)[:16]
