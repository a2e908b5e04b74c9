"""pipelines.headlines: the small per-stage DVC metrics derived from the full reports.

Synthetic reports in tmp_path for the behaviour; one test reads the committed reports/ and
checks structure only (never today's measured values)."""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from pipelines import headlines as hl
from pipelines.headlines import HEADLINES, HeadlineError, headlines_for, main, round_significant, write_headlines

KEY = re.compile(r"^[a-z0-9_]+$")


def pure_path_stages() -> list[str]:
    """Stages whose every headline is a plain JSON path of dict keys (no computed value)."""
    return [s for s, (_, spec) in HEADLINES.items()
            if all(isinstance(src, tuple) and all(isinstance(p, str) for p in src) for src in spec.values())]


def put(report: dict, path: tuple, value) -> None:
    node = report
    for part in path[:-1]:
        node = node.setdefault(part, {})
        assert isinstance(node, dict), f"path {path} crosses a value"
    assert path[-1] not in node, f"path {path} set twice"
    node[path[-1]] = value


def fake_report(stage: str) -> tuple[dict, dict]:
    """A report holding just the stage's headline paths, each a distinct unrounded value; and the
    headlines expected from it."""
    report, expected = {}, {}
    for i, (key, path) in enumerate(HEADLINES[stage][1].items()):
        value = (i + 1) * 0.123456789
        put(report, path, value)
        expected[key] = round_significant(value)
    return report, expected


def write_report(reports_dir: Path, stage: str, report: dict, table=HEADLINES) -> Path:
    path = reports_dir / Path(table[stage][0]).relative_to("reports")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))
    return path


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
def test_table_shape():
    assert HEADLINES
    for stage, (report, spec) in HEADLINES.items():
        assert report.startswith("reports/") and report.endswith(".json"), stage
        assert 2 <= len(spec) <= 10, f"{stage}: {len(spec)} headlines"
        for key, source in spec.items():
            assert KEY.match(key), f"{stage}: key {key!r} (lower case, digits, _ only: no '/' or '.')"
            assert callable(source) or (isinstance(source, tuple) and source
                                        and all(isinstance(p, (str, int)) for p in source)), (stage, key)


def test_degraded_metric_names_are_kept():
    """LPIPS here is on a randomly initialised AlexNet: a headline never renames it to plain LPIPS."""
    for stage, (_, spec) in HEADLINES.items():
        for key, source in spec.items():
            if "lpips" in key:
                assert "lpips_alex_randinit" in key, f"{stage}: {key}"
            if isinstance(source, tuple) and any("lpips_alex_randinit" in str(p) for p in source):
                assert "lpips_alex_randinit" in key, f"{stage}: {key} reads {source}"


def test_the_module_imports_only_the_standard_library_and_budgetdiff_io():
    tree = ast.parse(Path(hl.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not names & {"mlflow", "ray", "dvc", "torch"}
    assert {m for m in names if m.split(".")[0] in ("budgetdiff", "training", "pipelines")} <= {"budgetdiff.io"}


def dvc_reports() -> dict[str, set[str]]:
    """Stage name -> the JSON files under reports/ it declares (metrics or outs), foreach
    expanded with params.yaml; the existing *_headline.json files and reports/headlines/ excluded."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    out: dict[str, set[str]] = {}

    def reports_of(body: dict, item: dict | None) -> set[str]:
        found = set()
        for section in ("metrics", "outs"):
            for entry in body.get(section, []):
                path = entry if isinstance(entry, str) else next(iter(entry))
                if item is not None:
                    path = re.sub(r"\$\{item\.(\w+)\}", lambda m: str(item[m.group(1)]), path)
                if (path.startswith("reports/") and path.endswith(".json") and not path.endswith("_headline.json")
                        and not path.startswith(("reports/headlines/", "reports/scorecard/"))):
                    found.add(path)
        return found

    for name, stage in stages.items():
        if "foreach" in stage:
            var = re.fullmatch(r"\$\{(\w+)\}", stage["foreach"]).group(1)
            for key, item in params[var].items():
                out[f"{name}@{key}"] = reports_of(stage["do"], item)
        else:
            out[name] = reports_of(stage, None)
    return {k: v for k, v in out.items() if v}


def test_every_stage_report_in_dvc_yaml_has_headlines():
    declared = dvc_reports()
    assert all(len(v) == 1 for v in declared.values()), declared
    assert {s: next(iter(v)) for s, v in declared.items()} == {s: r for s, (r, _) in HEADLINES.items()}


# ----------------------------------------------------------------------------------------------
# Extraction on synthetic reports
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", pure_path_stages())
def test_paths_are_extracted(tmp_path, stage):
    report, expected = fake_report(stage)
    write_report(tmp_path, stage, report)
    assert headlines_for(stage, tmp_path) == expected


def test_pure_path_stages_cover_several_stages():
    assert {"bench_serve", "bench_budget", "tune_skip", "bench_monitor"} <= set(pure_path_stages())


def test_distill_targets_and_gflops_ratio(tmp_path):
    def target(measured, limit, met):
        return {"measured": measured, "limit": limit, "met": met}

    report = {
        "target_guidance": 1.25,
        "targets": {"fd_student_8_cfg_le_1.1x_teacher_50": target(0.050569, 0.056693, True),
                    "attr_acc_student_8_cfg_ge_teacher_8": target(0.72588, 0.72481, True),
                    "clipt_student_8_cfg_ge_student_8_vanilla": target(0.84941, 0.85041, False)},
        "results": {"teacher_50": {"1.0": {"gflops_per_image": 40.0}, "1.25": {"gflops_per_image": 81.832}},
                    "student_8_cfg": {"1.0": {"gflops_per_image": 6.5}, "1.25": {"gflops_per_image": 13.093}}},
    }
    write_report(tmp_path, "bench_distill", report)
    out = headlines_for("bench_distill", tmp_path)
    assert out["fd_target_met"] is True and out["clipt_target_met"] is False
    assert out["student_8_cfg_fd"] == 0.05057 and out["fd_limit_1_1x_teacher_50"] == 0.05669
    assert out["student_8_vanilla_clipt_seed_mean"] == 0.8504
    assert out["gflops_reduction_vs_teacher_50"] == round_significant(81.832 / 13.093) == 6.25
    assert list(out) == sorted(out)


def test_default_guidance_row_and_default_plan(tmp_path):
    sweep = {"1.0": {"all_attributes": 0.2, "position": 0.4}, "1.5": {"all_attributes": 0.31251, "position": 0.52}}
    write_report(tmp_path, "train_base", {"final_train_loss": 0.011440486, "default_guidance": 1.5,
                                          "guidance_sweep": sweep})
    assert headlines_for("train_base", tmp_path) == {
        "final_train_loss": 0.01144, "default_guidance": 1.5,
        "all_attributes_at_default_guidance": 0.3125, "position_at_default_guidance": 0.52}

    def cand(name, gflops, quality):
        return {"name": name, "measured": {"gflops_per_image": gflops, "mean_nfe": gflops / 1.6366,
                                           "quality_mean": quality, "attr_acc_vs_full": {"mean": -0.0016},
                                           "clipt_vs_full": {"mean": 0.0216}}}

    write_report(tmp_path, "calibrate_auto", {"policy": {
        "default": "base@5", "reference": {"gflops_per_image": 81.8323},
        "candidates": [cand("base@4", 6.5466, 0.79), cand("base@5", 8.1832, 0.84619)]}})
    out = headlines_for("calibrate_auto", tmp_path)
    assert out["default_gflops_reduction"] == 10.0 and out["default_quality_mean"] == 0.8462


def test_auto_lists_and_register_shapes(tmp_path):
    targets = {"auto_gflops_reduction": {"measured": 10.0, "met": True},
               "auto_attr_acc_within": {"measured": -0.00405, "met": True},
               "auto_clipt_within": {"measured": 0.00372, "met": True},
               "engine_overhead": {"measured_pct": -2.777, "met": True}}
    calibration = [{"promise_met": True, "share_reaching_target": 0.975},
                   {"promise_met": False, "share_reaching_target": 0.9}]
    write_report(tmp_path, "bench_auto", {"targets": targets, "calibration": calibration})
    out = headlines_for("bench_auto", tmp_path)
    assert out["quality_target_promise_met"] is False and out["quality_target_lowest_share_reaching"] == 0.9

    metrics = {"cost/gflops_per_image": 8.1832, "domain/attr_acc": 0.75816, "high/clipt_domainclip": 0.84938,
               "pixel/ssim": 0.84791, "mid/lpips_alex_randinit": 0.0062837}
    refused = {"registered": True, "gate": {"verdict": "refused", "failed": ["pixel/ssim"],
                                            "challenger_metrics": metrics, "champion_metrics": {}}}
    write_report(tmp_path, "register", refused)
    out = headlines_for("register", tmp_path)
    assert (out["gate_refused"], out["gate_promoted"], out["gate_checks_failed"]) == (True, False, 1)
    assert out["challenger_lpips_alex_randinit"] == 0.006284
    # unchanged: nothing judged now, the champion's (= challenger's) judged numbers are reported
    unchanged = {"registered": False, "gate": {"verdict": "unchanged", "champion_metrics": metrics}}
    write_report(tmp_path, "register", unchanged)
    out = headlines_for("register", tmp_path)
    assert (out["gate_refused"], out["gate_promoted"], out["gate_checks_failed"]) == (False, False, 0)
    assert out["challenger_ssim"] == 0.8479
    write_report(tmp_path, "register", {"registered": True, "gate": {"verdict": "maybe"}})
    with pytest.raises(HeadlineError, match=r"register: .*'maybe'"):
        headlines_for("register", tmp_path)


# ----------------------------------------------------------------------------------------------
# Values, rounding, determinism
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x, expected", [
    (0.123456, 0.1235), (123456.7, 123500.0), (1.23456e-7, 1.235e-7), (-0.00405449, -0.004054),
    (10.000036660475123, 10.0), (0.0, 0.0), (-0.0, 0.0), (2.5, 2.5)])
def test_round_significant(x, expected):
    assert round_significant(x) == expected
    assert json.dumps(round_significant(x)) == json.dumps(expected)


def test_ints_and_bools_are_kept_and_non_numbers_rejected(tmp_path):
    table = {"s": ("reports/s.json", {"n": ("n",), "ok": ("ok",), "x": ("x",)})}
    write_report(tmp_path, "s", {"n": 6240, "ok": False, "x": 1.0 / 3}, table)
    out = headlines_for("s", tmp_path, table)
    assert out == {"n": 6240, "ok": False, "x": 0.3333}
    assert type(out["n"]) is int and type(out["ok"]) is bool
    for bad in (None, "0.5", [1, 2], float("nan"), float("inf")):
        (tmp_path / "s.json").write_text(json.dumps({"n": 1, "ok": True, "x": bad}))
        with pytest.raises(HeadlineError, match=r"stage s: .*'x'"):
            headlines_for("s", tmp_path, table)


def test_second_run_writes_the_same_bytes(tmp_path):
    stages = ["bench_serve", "bench_budget"]
    for stage in stages:
        write_report(tmp_path / "reports", stage, fake_report(stage)[0])
    out = tmp_path / "headlines"
    first = write_headlines(stages, tmp_path / "reports", out)
    before = {p.name: p.read_bytes() for p in first}
    second = write_headlines(stages, tmp_path / "reports", out)
    assert {p.name: p.read_bytes() for p in second} == before
    assert sorted(p.name for p in out.iterdir()) == ["bench_budget.json", "bench_serve.json"]  # no temp files
    for data in before.values():
        text = data.decode()
        assert text.endswith("\n") and list(json.loads(text)) == sorted(json.loads(text))


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
def test_missing_key_names_stage_report_and_path(tmp_path):
    report, _ = fake_report("bench_serve")
    del report["overhead"]["ratio"]
    path = write_report(tmp_path, "bench_serve", report)
    with pytest.raises(HeadlineError) as err:
        headlines_for("bench_serve", tmp_path)
    msg = str(err.value)
    assert "bench_serve" in msg and str(path) in msg and '["overhead"]["ratio"]' in msg


def test_missing_key_inside_a_computed_headline_names_its_path(tmp_path):
    write_report(tmp_path, "train_base", {"final_train_loss": 0.1, "default_guidance": 2.0,
                                          "guidance_sweep": {"1.0": {"all_attributes": 0.2, "position": 0.4}}})
    with pytest.raises(HeadlineError, match=r'train_base.*\["guidance_sweep"\]\["2.0 \(default_guidance\)"\]'):
        headlines_for("train_base", tmp_path)


def test_missing_report_is_an_error(tmp_path):
    with pytest.raises(HeadlineError, match=r"stage render: report .*render\.json is missing"):
        headlines_for("render", tmp_path)


def test_nothing_is_written_when_a_stage_fails(tmp_path):
    write_report(tmp_path / "reports", "bench_serve", fake_report("bench_serve")[0])
    with pytest.raises(HeadlineError):
        write_headlines(["bench_serve", "tune_skip"], tmp_path / "reports", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_main_writes_the_chosen_stages(tmp_path, capsys):
    write_report(tmp_path / "r", "tune_skip", fake_report("tune_skip")[0])
    assert main(["--reports-dir", str(tmp_path / "r"), "--out-dir", str(tmp_path / "h"), "--scorecard-dir",
                 str(tmp_path / "s"), "--stage", "tune_skip"]) == 0
    assert [p.name for p in (tmp_path / "h").iterdir()] == ["tune_skip.json"]
    assert json.loads(capsys.readouterr().out) == {"headlines": [
        str(tmp_path / "h" / "tune_skip.json"), str(tmp_path / "s" / "tune_skip.json"), str(tmp_path / "s.md")]}
    card = json.loads((tmp_path / "s" / "tune_skip.json").read_text())
    assert set(card) == {"speedup", "quality"}  # the fake report's *_met values are numbers, not targets
    assert "| tune_skip | reports/tune_skip.json | ddim_holdout_nfe_speedup |" in (tmp_path / "s.md").read_text()


# ----------------------------------------------------------------------------------------------
# The scorecards: the DVC metrics
# ----------------------------------------------------------------------------------------------
def test_every_stage_has_a_scorecard_naming_its_own_headlines():
    assert set(hl.SCORECARD) == set(HEADLINES)
    for stage, words in hl.SCORECARD.items():
        assert set(words) <= set(hl.WORDS[2:]), stage
        assert set(words.values()) <= set(HEADLINES[stage][1]), stage
        has_targets = any(k.endswith("_met") for k in HEADLINES[stage][1])
        assert words or has_targets, f"{stage}: an empty scorecard"


def test_scorecard_counts_targets_and_names_a_bad_word():
    headlines = {"a_met": True, "b_met": False, "complete": True, "ratio": 2.5, "psnr": 30.0}
    card = hl.scorecard_for("bench_adaptive", {**headlines, "ddim_nfe_speedup": 2.8, "ddim_psnr": 39.0})
    assert card == {"targets_met": 1, "targets": 2, "speedup": 2.8, "quality": 39.0}
    assert list(card) == ["targets_met", "targets", "speedup", "quality"]  # the words' order
    with pytest.raises(HeadlineError, match="names 'ddim_psnr', not one of its headlines"):
        hl.scorecard_for("bench_adaptive", {"ddim_nfe_speedup": 2.8})
    with pytest.raises(HeadlineError, match="no scorecard entry"):
        hl.scorecard_for("no_such_stage", headlines)


def test_dvc_metrics_are_the_scorecards_and_few_columns():
    """`dvc metrics show` fits a screen: the declared metrics are one scorecard per stage, and
    all of them together use at most the shared words as columns."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["headlines"]
    metrics = [next(iter(m)) for m in stage["metrics"]]
    assert metrics == [f"reports/scorecard/{hl.headline_file(s)}" for s in HEADLINES]
    outs = [next(iter(o)) for o in stage["outs"]]
    assert outs == [f"reports/headlines/{hl.headline_file(s)}" for s in HEADLINES] + ["reports/scorecard.md"]
    columns = {w for words in hl.SCORECARD.values() for w in words} | {"targets_met", "targets"}
    assert len(columns) <= len(hl.WORDS) <= 8


def test_main_exits_2_with_one_line(tmp_path, capsys):
    report, _ = fake_report("tune_skip")
    del report["schedulers"]["euler"]
    write_report(tmp_path, "tune_skip", report)
    code = main(["--reports-dir", str(tmp_path), "--out-dir", str(tmp_path / "h"), "--stage", "tune_skip"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: stage tune_skip: report ") and '["euler"]' in err
    assert not (tmp_path / "h").exists()
    assert main(["--reports-dir", str(tmp_path), "--stage", "no_such_stage"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown stage 'no_such_stage'")


# ----------------------------------------------------------------------------------------------
# The committed reports: structure only
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", list(HEADLINES))
def test_committed_reports_resolve(stage):
    report = REPO / HEADLINES[stage][0]
    if not report.is_file():
        pytest.skip(f"{HEADLINES[stage][0]} is not committed yet")
    out = headlines_for(stage, REPO / "reports")
    assert 2 <= len(out) <= 10
    for key, value in out.items():
        assert isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)), (key, value)


def test_foreach_members_get_file_names_without_dvc_revision_syntax():
    from pipelines.headlines import headline_file

    assert headline_file("distill_8@cfg_seed1") == "distill_8-cfg_seed1.json"
    assert headline_file("bench_serve") == "bench_serve.json"
