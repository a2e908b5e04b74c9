"""mlops.params.load_params: sections and their required keys."""

import pytest

from mlops.params import ParamsError, load_params


def test_required_keys_are_named_when_missing(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("render:\n  model: models/base\n")
    assert load_params("render", path, required=["model"]) == {"model": "models/base"}
    with pytest.raises(ParamsError, match=r"section 'render' lacks step_grid, workers"):
        load_params("render", path, required=["model", "step_grid", "workers"])
    with pytest.raises(ParamsError, match="no section 'score'"):
        load_params("score", path)


from dataclasses import dataclass, field  # noqa: E402
from typing import Literal, Optional  # noqa: E402

from mlops.params import config_dict, config_from_dict, load_config  # noqa: E402


@dataclass(frozen=True)
class _Unet:
    width: int
    levels: list[bool] = field(default_factory=lambda: [False, True])


@dataclass(frozen=True)
class _Stage:
    model: str
    lr: float
    steps: int
    unet: _Unet
    scheduler: Literal["ddim", "euler"] = "ddim"
    guidance: Optional[float] = None
    grid: tuple[int, ...] = (2, 4)
    extra: dict[str, float] = field(default_factory=dict)


def test_load_config_reads_a_section_into_its_dataclass(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("s:\n  model: m\n  lr: 1\n  steps: 3\n  unet: {width: 8}\n  grid: [1, 2]\n"
                    "ft:\n  lr: 2.0e-4\n  guidance: 1.5\n")
    cfg = load_config("s", _Stage, path)
    assert cfg == _Stage("m", 1.0, 3, _Unet(8, [False, True]), grid=(1, 2))
    assert isinstance(cfg.lr, float) and cfg.grid == (1, 2)
    ft = load_config("s", _Stage, path, overrides=["ft"])
    assert (ft.lr, ft.guidance, ft.steps) == (2.0e-4, 1.5, 3)
    assert config_dict(ft)["unet"] == {"width": 8, "levels": [False, True]}


@pytest.mark.parametrize("body, message", [
    ("  steps: 3\n  unet: {width: 8}\n  lr: 1\n", r"section 's' lacks model"),
    ("  model: m\n  lr: 1\n  steps: 3\n  unet: {width: 8}\n  stpes: 4\n", r"unknown key stpes \(known: model"),
    ("  model: m\n  lr: fast\n  steps: 3\n  unet: {width: 8}\n", r"section 's': lr: expected a number, got 'fast'"),
    ("  model: m\n  lr: 1\n  steps: 2.5\n  unet: {width: 8}\n", r"steps: expected an integer, got 2.5"),
    ("  model: m\n  lr: 1\n  steps: true\n  unet: {width: 8}\n", r"steps: expected an integer, got True"),
    ("  model: m\n  lr: 1\n  steps: 3\n  unet: {width: 8, depth: 2}\n", r"unet: unknown key depth"),
    ("  model: m\n  lr: 1\n  steps: 3\n  unet: {width: 8}\n  scheduler: pndm\n",
     r"scheduler: expected one of 'ddim', 'euler', got 'pndm'"),
    ("  model: m\n  lr: 1\n  steps: 3\n  unet: {width: 8}\n  grid: [1, x]\n", r"grid\[1\]: expected an integer"),
    ("  model: null\n  lr: 1\n  steps: 3\n  unet: {width: 8}\n", r"model: must not be null"),
    ("  model: m\n  lr: 5e-4\n  steps: 3\n  unet: {width: 8}\n", r"lr: expected a number, got '5e-4'"),
])
def test_load_config_names_the_bad_key(tmp_path, body, message):
    path = tmp_path / "params.yaml"
    path.write_text("s:\n" + body)
    with pytest.raises(ParamsError, match=message):
        load_config("s", _Stage, path)


def test_config_from_dict_refuses_non_mappings():
    with pytest.raises(ParamsError, match="expected a mapping of keys, got list"):
        config_from_dict(_Unet, [1, 2], "x")
