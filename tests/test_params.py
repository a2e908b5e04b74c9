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
