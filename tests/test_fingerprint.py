"""budgetdiff.fingerprint: one hash per idea, and the values stored with the models still hold."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from budgetdiff.fingerprint import FingerprintError, directory_fingerprint, unet_fingerprint

REPO = Path(__file__).resolve().parents[1]


def test_unet_fingerprint_is_the_value_the_budget_predictor_stored():
    """models/budget/config.json records the base model's UNet fingerprint; the engine refuses
    a predictor whose value differs, so the one helper must reproduce it."""
    stored = json.loads((REPO / "models" / "budget" / "config.json").read_text())["model"]
    assert unet_fingerprint(REPO / stored["path"]) == stored["unet_sha256"]


def _old_budget_fingerprint(model_dir: Path) -> str:  # budgetdiff.budget.model_fingerprint before the merge
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
