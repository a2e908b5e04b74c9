"""``budgetdiff score``: every applicable metric as the last JSON line, one-line errors."""

import json

import pytest
from PIL import Image

from budgetdiff.cli import main
from budgetdiff.domain.evaluators import domain_clip_model_cfg, save_attribute_checker, save_domain_clip
from budgetdiff.domain.scenes import SceneObject, SceneSpec, render_scene_array, sample_scene, spec_to_prompt
from conftest import REPO
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
                           "high/iclip_domainclip", "high/clipt_domainclip", "domain/attr_acc", "domain/attr_scored"}
    # a domain prompt states every attribute of every object, and the background
    assert values["domain/attr_scored"]["background"] is True
    assert [o["attributes"] for o in values["domain/attr_scored"]["objects"]] == (
        [["color", "shape", "size", "position", "texture"]] * len(SPEC.objects))
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


# The trained checker (committed with the repository) on rendered ground truth.
TRAINED_CHECKER = REPO / "models" / "attributes"
RED_CIRCLE = "a red circle in the center on a white background"  # the size is unstated


def score_with_trained_checker(files, capsys, spec: SceneSpec, prompt: str, name: str):
    Image.fromarray(render_scene_array(spec)).save(files / name)
    code, out, err = run(["score", str(files / name), "--prompt", prompt, "--clip-dir", str(files / "clip"),
                          "--attributes-dir", str(TRAINED_CHECKER)], capsys)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def circle(color: str, size: str, background: str) -> SceneSpec:
    return SceneSpec(objects=(SceneObject("circle", color, size, "center"),), background=background)


@pytest.mark.parametrize("size", ["small", "large"])
def test_attr_acc_for_a_prompt_with_unstated_size(files, capsys, size):
    values, _ = score_with_trained_checker(files, capsys, circle("red", size, "white"), RED_CIRCLE, f"red_{size}.png")
    assert values["domain/attr_acc"] == 1.0  # either size is right: it is not scored
    assert values["domain/attr_scored"] == {
        "objects": [{"object": "red circle in the center", "attributes": ["color", "shape", "position", "texture"]}],
        "background": True,
    }


def test_unstated_size_is_not_in_the_denominator(files, capsys):
    # a blue circle: one of the five stated attributes is wrong (4/6 or 5/6 if the size were scored)
    values, _ = score_with_trained_checker(files, capsys, circle("blue", "small", "white"), RED_CIRCLE, "blue.png")
    assert values["domain/attr_acc"] == 0.8


def test_background_outside_the_domain_leaves_the_background_unscored(files, capsys):
    values, err = score_with_trained_checker(files, capsys, circle("red", "large", "black"),
                                             "a large red circle in the middle on a teal background", "black.png")
    assert values["domain/attr_acc"] == 1.0  # five object attributes right; the background not scored
    assert values["domain/attr_scored"]["background"] is False
    assert values["domain/attr_scored"]["objects"][0]["attributes"] == ["color", "shape", "size", "position", "texture"]
    assert "note: domain/attr_acc: background colour 'teal' is outside the domain" in err


def test_unreadable_prompt_leaves_attr_acc_out_with_the_reason(files, capsys):
    values, err = score_with_trained_checker(files, capsys, circle("red", "large", "white"), "a red dog", "dog.png")
    assert "domain/attr_acc" not in values and "domain/attr_scored" not in values
    assert "high/clipt_domainclip" in values
    assert "note: domain/attr_acc left out: shape 'dog' is outside the scene domain" in err
