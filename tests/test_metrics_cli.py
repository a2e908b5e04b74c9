"""``budgetdiff score``: every applicable metric as the last JSON line, one-line errors."""

import json

import pytest
from PIL import Image

from budgetdiff.cli import main
from budgetdiff.evaluators import domain_clip_model_cfg, save_attribute_checker, save_domain_clip
from budgetdiff.scenes import render_scene_array, sample_scene, spec_to_prompt
from test_metrics_helpers import TINY_CLIP_CFG, tiny_checker, tiny_clip

SPEC = sample_scene(5)
PROMPT = spec_to_prompt(SPEC)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    Image.fromarray(render_scene_array(SPEC)).save(root / "image.png")
    Image.fromarray(render_scene_array(SPEC, 64)).save(root / "big.png")
    (root / "notes.png").write_text("not an image")
    model, _ = tiny_clip()
    save_domain_clip(model, domain_clip_model_cfg(TINY_CLIP_CFG), root / "clip")
    save_attribute_checker(tiny_checker(), root / "attributes")
    return root


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_prints_every_metric(files, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path))
    image = str(files / "image.png")
    code, out, _ = run(["score", image, "--ref", image, "--prompt", PROMPT, "--clip-dir", str(files / "clip"),
                        "--attributes-dir", str(files / "attributes")], capsys)
    assert code == 0
    values = json.loads(out.strip().splitlines()[-1])
    assert set(values) == {"pixel/lsnr", "pixel/psnr", "pixel/ssim", "mid/lpips_alex_randinit",
                           "high/iclip_domainclip", "high/clipt_domainclip", "domain/attr_acc"}
    assert values["pixel/psnr"] == 100.0 and values["mid/lpips_alex_randinit"] == 0.0
    assert values["high/iclip_domainclip"] == pytest.approx(1.0, abs=1e-5)


def test_no_reference_no_prompt_and_missing_default_models(files, capsys, monkeypatch):
    monkeypatch.chdir(files)  # no models/ here: the default directories are missing
    code, out, err = run(["score", "image.png", "--prompt", PROMPT], capsys)
    assert code == 0 and set(json.loads(out.strip().splitlines()[-1])) == {"pixel/lsnr"}
    assert "dvc repro train_clip" in err and "dvc repro train_attributes" in err


@pytest.mark.parametrize("args, message", [
    (["missing.png"], "IMAGE: 'missing.png' does not exist"),
    (["notes.png"], "IMAGE: 'notes.png' is not a readable image file"),
    (["image.png", "--ref", "notes.png"], "--ref: 'notes.png' is not a readable image file"),
    (["image.png", "--ref", "big.png"], "--ref: reference is 64x64 but IMAGE is 32x32; pass --resize"),
    (["image.png", "--prompt", " "], "--prompt: must not be empty"),
    (["image.png", "--clip-dir", "nowhere"], "--clip-dir: directory 'nowhere' does not exist"),
])
def test_bad_input_is_one_line(files, capsys, monkeypatch, args, message):
    monkeypatch.chdir(files)
    code, out, err = run(["score", *args], capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_resize(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    code, out, _ = run(["score", "image.png", "--ref", "big.png", "--resize"], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["pixel/psnr"] > 20
