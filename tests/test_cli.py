import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from budgetdiff.cli import main

PROMPT = "a small red circle at the top left on a white background"


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "args, names",
    [
        (["generate", ""], "prompt"),
        (["generate", "   "], "prompt"),
        (["generate", PROMPT, "--scheduler", "heun"], "--scheduler"),
        (["generate", PROMPT, "--steps", "0"], "--steps"),
        (["generate", PROMPT, "--steps", "1001"], "--steps"),
        (["generate", PROMPT, "--steps", "ten"], "--steps"),
        (["generate", PROMPT, "--guidance", "nan"], "--guidance"),
        (["generate", PROMPT, "--guidance", "inf"], "--guidance"),
        (["generate", PROMPT, "--model", "/no/such/dir"], "--model"),
        (["generate", PROMPT, "--out", "/no/such/dir/x.png"], "--out"),
        (["generate", PROMPT, "--out", "picture.jpg"], "--out"),
        (["generate", PROMPT, "--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_arguments_give_one_line(args, names, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and names in lines[0], err
    assert "Traceback" not in err


def test_invalid_model_directory(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text("{not json")
    code, _, err = run_cli(["generate", PROMPT, "--model", str(tmp_path), "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "--model" in err and len(err.strip().splitlines()) == 1


def test_unwritable_output(tiny_model_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if (locked / "probe").exists() or _can_write(locked):
            pytest.skip("running as a user who can write anywhere")
        code, _, err = run_cli(["generate", PROMPT, "--model", str(tiny_model_dir), "--out", str(locked / "x.png")],
                               capsys)
        assert code == 2 and "--out" in err
    finally:
        locked.chmod(0o700)


def _can_write(directory: Path) -> bool:
    try:
        (directory / ".probe").write_text("x")
        (directory / ".probe").unlink()
        return True
    except OSError:
        return False


def test_output_directory_is_rejected(tiny_model_dir, tmp_path, capsys):
    target = tmp_path / "dir.png"
    target.mkdir()
    code, _, err = run_cli(["generate", PROMPT, "--model", str(tiny_model_dir), "--out", str(target)], capsys)
    assert code == 2 and "--out" in err


def test_generate_writes_png_and_json(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    code, stdout, _ = run_cli(["generate", PROMPT, "--model", str(tiny_model_dir), "--steps", "3",
                               "--scheduler", "euler", "--seed", "5", "--out", str(out), "--upscale", "2"], capsys)
    assert code == 0
    record = json.loads(stdout.strip().splitlines()[-1])
    for key in ("steps", "nfe", "scheduler", "seed", "seconds", "model"):
        assert key in record
    assert record["steps"] == 3 and record["nfe"] == 3 and record["scheduler"] == "euler" and record["seed"] == 5
    assert Image.open(out).size == (32, 32)


def test_console_script_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "budgetdiff.cli", "generate", "x", "--steps", "-3"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.startswith("error:")
