"""The ``prompts`` stage: scene prompts stratified and split by prompt; user prompt files with bad
lines reported line by line and skipped."""

import pandas as pd
import pytest

import mlops.params
from budgetdiff.domain import prompt_table
from budgetdiff.io.prompt_files import PromptFileError, read_prompt_file
from conftest import cli_error
from mlops.params import config_from_dict
from pipelines import prompts as stage

CFG = {"source": "scenes", "n_prompts": 40, "count_weights": [0.25, 0.25, 0.25, 0.25], "seed_offset": 60_000_000,
       "split": {"train": 0.8, "val": 0.1, "test": 0.1}, "split_seed": 0, "max_prompt_chars": 80,
       "output": "unused.parquet", "report_path": "unused.json"}


def config(**changes) -> stage.PromptsConfig:
    return config_from_dict(stage.PromptsConfig, {**CFG, **changes})


def test_scene_prompts_are_stratified_and_split_by_prompt():
    frame, rejected = stage.build_prompts(config())
    assert rejected == [] and list(frame.columns) == list(stage.PROMPT_COLUMNS)
    assert frame["prompt_id"].tolist() == list(range(40)) and frame["prompt"].is_unique and frame["seed"].is_unique
    counts = frame.groupby(["complexity", "split"]).size().unstack()
    assert (counts["train"] == 8).all() and (counts["val"] == 1).all() and (counts["test"] == 1).all()
    again, _ = stage.build_prompts(config())
    pd.testing.assert_frame_equal(frame, again)  # deterministic
    assert prompt_table.quotas(7, [1, 1, 1]) == [3, 2, 2] and sum(prompt_table.quotas(10, [0.8, 0.1, 0.1])) == 10


BAD_FILE = b"".join([
    b"a small red circle at the top left on a white background\n",   # 1 good (scene domain)
    b"\n",                                                             # 2 empty
    b"   \t \n",                                                       # 3 empty (whitespace)
    b"x" * 81 + b"\n",                                                 # 4 over-long
    b"a caf\xe9 on the corner\n",                                      # 5 not UTF-8 (latin-1)
    b"a dog \x00 on a beach\n",                                        # 6 control character
    b"A small red  circle at the top left on a white background\r\n",  # 7 duplicate of 1
    b"a cat sleeping on a sofa\n",                                     # 8 good (outside the domain)
    "un café près de la gare\n".encode(),                              # 9 good (UTF-8)
])


def test_bad_lines_reported_line_by_line_and_skipped(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(BAD_FILE)
    result = read_prompt_file(path, max_chars=80)
    assert [p.line for p in result.prompts] == [1, 8, 9]
    reasons = {r.line: r.reason for r in result.rejected}
    assert reasons[2] == "empty" and reasons[3] == "empty"
    assert reasons[4] == "over-long (81 characters > 80)"
    assert reasons[5].startswith("not UTF-8 (invalid byte 0xe9")
    assert reasons[6] == "control characters (U+0000)"
    assert reasons[7] == "duplicate of line 1"
    assert str(result.rejected[0]) == f"{path}:2: empty"


def test_stage_on_a_prompt_file(tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_bytes(BAD_FILE)
    cfg = config(source=str(path), n_prompts=None, output=str(tmp_path / "p.parquet"),
                 report_path=str(tmp_path / "report.json"))
    report = stage.run(cfg)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6 and err[0] == f"skipped {path}:2: empty" and len(report["rejected_lines"]) == 6
    frame = pd.read_parquet(cfg.output)
    assert frame["prompt"].tolist()[1] == "a cat sleeping on a sofa"
    assert frame["complexity"].tolist()[0] == 1 and frame["complexity"].between(1, 4).all()
    assert frame["seed"].tolist() == [60_000_000, 60_000_001, 60_000_002]


def test_csv_prompt_column(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_bytes(b'id,Prompt,source\n1,"a dog, running on a beach",coco\n2,,coco\n3\n'
                     b'4,"two lines\nin one field",diffusiondb\n5,\xff\xfe,x\n6,a red car,coco\n')
    result = read_prompt_file(path)
    assert [(p.line, p.text) for p in result.prompts] == [(2, "a dog, running on a beach"),
                                                           (5, "two lines in one field"), (8, "a red car")]
    assert [(r.line, r.reason.split(" (")[0]) for r in result.rejected] == [
        (3, "empty"), (4, "no 'prompt' field in this row"), (7, "not UTF-8")]


def _main_error(tmp_path, monkeypatch, capsys, section: dict) -> str:
    params = tmp_path / "params.yaml"
    import yaml

    params.write_text(yaml.safe_dump({"prompts": {**CFG, "output": str(tmp_path / "p.parquet"),
                                                  "report_path": str(tmp_path / "r.json"), **section}}))
    monkeypatch.setattr(mlops.params, "PARAMS_FILE", params)
    return cli_error(capsys, stage.main)


def test_unusable_input_is_one_line_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "bad.csv").write_text("id,text\n1,a dog\n")
    message = _main_error(tmp_path, monkeypatch, capsys, {"source": str(tmp_path / "bad.csv")})
    assert message == f"error: prompt_file: {tmp_path / 'bad.csv'} has no 'prompt' column (header: id, text)"
    assert "does not exist" in _main_error(tmp_path, monkeypatch, capsys, {"source": str(tmp_path / "missing.txt")})
    (tmp_path / "empty.txt").write_bytes(b"\n \n\xff\n")
    assert "has no valid prompt (3 line(s) rejected)" in _main_error(tmp_path, monkeypatch, capsys,
                                                                      {"source": str(tmp_path / "empty.txt")})
    assert "n_prompts" in _main_error(tmp_path, monkeypatch, capsys, {"n_prompts": 0})
    assert _main_error(tmp_path, monkeypatch, capsys, {"split": {"train": 0.8, "val": 0.2}}) == (
        f"error: params file {tmp_path / 'params.yaml'}: section 'prompts': split lacks test")
    assert "n_prompts: expected int or NoneType, got 'all'" in _main_error(tmp_path, monkeypatch, capsys,
                                                                           {"n_prompts": "all"})
    with pytest.raises(PromptFileError):
        read_prompt_file(tmp_path)  # a directory


def test_the_data_stages_share_the_library_splits():
    """pipelines.schema keeps its own copy of the split names (so that score and dataset do not
    depend on the scene code); it must equal the library's."""
    from pipelines import schema

    assert schema.SPLITS == prompt_table.SPLITS
