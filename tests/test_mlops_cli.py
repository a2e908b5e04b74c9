"""mlops.cli: every command's errors are one ``error: ...`` line and exit status 2."""

import pytest

from mlops.cli import ArgumentParser, command, fail, print_error


def test_print_error_folds_the_message_into_one_line(capsys):
    assert print_error("first line\n  second\tline") == 2
    assert capsys.readouterr().err == "error: first line second line\n"


def test_fail_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        fail("no such file: x.yaml")
    assert exc.value.code == 2 and capsys.readouterr().err == "error: no such file: x.yaml\n"


def test_argument_parser_errors_are_one_line_without_usage(capsys):
    parser = ArgumentParser(prog="tool")
    parser.add_argument("--n", type=int, required=True)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--n", "x"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("error: argument --n: invalid int")
    assert "usage" not in err


def test_command_turns_expected_errors_into_one_line(capsys, monkeypatch):
    class StageError(RuntimeError):
        pass

    @command(also=(StageError,))
    def main(kind):
        raise {"value": ValueError("params.yaml: bench.steps must be >= 1"), "stage": StageError("stage broke"),
               "bug": KeyError("bug")}[kind]

    for kind, line in (("value", "error: params.yaml: bench.steps must be >= 1\n"), ("stage", "error: stage broke\n")):
        with pytest.raises(SystemExit) as exc:
            main(kind)
        assert exc.value.code == 2 and capsys.readouterr().err == line
    with pytest.raises(KeyError):  # a bug is not an expected error: its traceback shows
        main("bug")
    monkeypatch.setenv("BUDGETDIFF_TRACEBACK", "1")
    with pytest.raises(ValueError):
        main("value")
