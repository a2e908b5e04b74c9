"""The SD 1.5 / SDXL path of `budgetdiff generate`, on tiny random components built here."""

import json

import pytest
from PIL import Image

from budgetdiff.cli import main
from budgetdiff.generation.loading import generate, load_pipeline, model_class_name


@pytest.mark.parametrize("which", ["tiny_sd_dir", "tiny_sdxl_dir"])
@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp", "euler"])
def test_stock_pipelines_generate(which, scheduler, request):
    model_dir = request.getfixturevalue(which)
    pipe = load_pipeline(model_dir)
    images, records = generate(pipe, ["a red circle"], steps=3, guidance=5.0, scheduler=scheduler, seed=1,
                               progress=False)
    assert images[0].size == (32, 32)
    assert records[0]["nfe"] == 3 and records[0]["steps"] == 3
    assert records[0]["scheduler"] == scheduler


def test_stock_pipeline_is_seeded(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir)
    a, _ = generate(pipe, ["a red circle"], steps=2, seed=3, progress=False)
    b, _ = generate(pipe, ["a red circle"], steps=2, seed=3, progress=False)
    assert list(a[0].getdata()) == list(b[0].getdata())


def test_model_kind_detection(tiny_sd_dir, tiny_sdxl_dir, tiny_model_dir):
    assert model_class_name(tiny_sd_dir) == "StableDiffusionPipeline"
    assert model_class_name(tiny_sdxl_dir) == "StableDiffusionXLPipeline"
    assert model_class_name(tiny_model_dir) == "BudgetDiffusionPipeline"


def test_cli_on_sdxl(tiny_sdxl_dir, tmp_path, capsys):
    out = tmp_path / "sdxl.png"
    code = main(["generate", "a blue square", "--model", str(tiny_sdxl_dir), "--steps", "2", "--out", str(out)])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and record["nfe"] == 2 and Image.open(out).size == (32, 32)
