"""The bundle stage builds models/bundle from measured reports, never from typed-in values."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from budgetdiff.generation.bundle import load_bundle
from budgetdiff.methods.policy import load_skip_policy
from mlops.params import ParamsError, config_from_dict
from pipelines.bundle import (BundleConfig, BundleStageError, SkipPolicySource, build, cheapest_guidance_within,
                              skip_policy_from_adaptive_report)


def adaptive_report() -> dict:
    def row(delta, speedup, ssim, lpips, iclip):
        return {"kind": "adaptive", "params": {"threshold": delta}, "nfe_speedup": speedup, "mean_nfe": 50 / speedup,
                "pixel/ssim": ssim, "mid/lpips_alex_randinit": lpips, "high/iclip_domainclip": iclip}

    rows = [{"kind": "full", "params": {}}, row(0.01, 1.2, 0.999, 0.0001, 0.9999), row(0.1, 2.8, 0.97, 0.001, 0.98),
            {"kind": "adaptive_official", "params": {"threshold": 0.01}, "nfe_speedup": 2.0}]
    return {"steps": 50, "max_skip": 3, "warmup": 5, "reuse": {"ddim": "sample", "euler": "epsilon"},
            "tuned_thresholds": {"ddim": 0.1, "euler": 0.01},
            "schedulers": {"ddim": {"rows": rows}, "euler": {"rows": rows}}}


def distill_report() -> dict:
    def m(attr, clipt, gflops):
        return {"attr_acc": attr, "clipt": clipt, "gflops_per_image": gflops}

    return {"target_guidance": 1.25, "scheduler": "ddim",
            "runs": {"teacher_50": {"steps": 50}, "student_8_cfg": {"steps": 8}},
            "results": {"teacher_50": {"1.25": m(0.73, 0.84, 80.0)},
                        "student_8_cfg": {"1.0": m(0.715, 0.845, 6.5), "1.25": m(0.726, 0.85, 13.0),
                                          "1.5": m(0.73, 0.85, 13.0)}}}


def test_operating_points_come_from_the_report_rows():
    policy = skip_policy_from_adaptive_report(adaptive_report(), {"stage": "bench_adaptive"})
    ddim, euler = policy.for_scheduler("ddim"), policy.for_scheduler("euler")
    assert [p.name for p in ddim.points] == ["delta=0.01", "delta=0.1"]  # official-estimator rows left out
    assert ddim.default == "delta=0.1" and euler.default == "delta=0.01"
    point = ddim.point("delta=0.1")
    assert point.config.reuse == "sample" and point.config.max_skip == 3 and point.config.warmup == 5
    assert point.quality == pytest.approx(0.97) and point.nfe_speedup == 2.8
    assert euler.point().config.reuse == "epsilon" and policy.steps == 50


def test_auto_guidance_is_the_cheapest_within_tolerance():
    g, why = cheapest_guidance_within(distill_report(), "student_8_cfg", "teacher_50", "1.25",
                                      {"attr_acc": 0.02, "clipt": 0.005})
    assert g == 1.0 and why["within_tolerances"] and why["gflops_per_image"] == 6.5
    g, why = cheapest_guidance_within(distill_report(), "student_8_cfg", "teacher_50", "1.25",
                                      {"attr_acc": 0.01, "clipt": 0.005})
    assert g == 1.25 and why["within_tolerances"]  # w 1.0 drops attr_acc by 0.015
    g, why = cheapest_guidance_within(distill_report(), "student_8_cfg", "teacher_50", "1.25",
                                      {"attr_acc": -1.0, "clipt": 0.0})
    assert g == 1.25 and why["within_tolerances"] is False  # none qualifies: the judged guidance, flagged
    with pytest.raises(BundleStageError, match="no run"):
        cheapest_guidance_within(distill_report(), "student_x", "teacher_50", "1.25", {"attr_acc": 0.01})


def test_build_writes_a_bundle_that_loads(tiny_bundle_dir, tmp_path):
    models = tiny_bundle_dir.parent
    (tmp_path / "adaptive.json").write_text(json.dumps(adaptive_report()))
    (tmp_path / "distill.json").write_text(json.dumps(distill_report()))
    cfg = config_from_dict(BundleConfig, {
        "output_dir": str(tmp_path / "bundle"), "base": {"path": str(models / "base"), "scheduler": "ddim", "steps": 20},
        "student": {"path": str(models / "student"), "run": "student_8_cfg", "report": str(tmp_path / "distill.json")},
        "budget": str(models / "budget"), "skip_policy": {"report": str(tmp_path / "adaptive.json")},
        "auto": {"student_max_steps": 12, "reference_run": "teacher_50",
                 "tolerances": {"attr_acc": 0.02, "clipt": 0.005}}})
    summary = build(cfg)
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.student.guidance == 1.25 and bundle.student.steps == 8
    assert bundle.auto.student_guidance == 1.0 and bundle.auto.student_max_steps == 12
    assert bundle.plateau_epsilon == 0.01 and bundle.skip_policy.sha256 == summary["skip_policy_sha256"]
    assert bundle.raw["base"]["path"] == "../" + models.name + "/base" or bundle.base == str((models / "base").resolve())
    assert bundle.raw["auto"]["source"]["student_guidance"]["tolerances"] == {"attr_acc": 0.02, "clipt": 0.005}
    assert bundle.raw["auto"]["source"]["student_guidance"]["report"] == str(tmp_path / "distill.json")
    # A tuned policy file replaces the report's points.
    from tests.conftest import tiny_skip_policy

    tuned = tiny_skip_policy(thresholds=(0.2,), default=0.2)
    tuned.save(tmp_path / "tuned.json")
    build(replace(cfg, skip_policy=SkipPolicySource(policy=str(tmp_path / "tuned.json"))))
    loaded = load_skip_policy(tmp_path / "bundle" / "skip_policy.json")
    assert [p.name for p in loaded.for_scheduler("ddim").points] == ["delta=0.2"]
    assert loaded.source["policy_file"] == str(tmp_path / "tuned.json")
    with pytest.raises(BundleStageError, match="does not exist"):
        build(replace(cfg, skip_policy=SkipPolicySource(report=str(tmp_path / "missing.json"))))
    with pytest.raises(BundleStageError, match="give a policy file"):
        build(replace(cfg, skip_policy=SkipPolicySource()))


def test_the_bundle_section_is_read_once_and_checked(tmp_path, monkeypatch, capsys):
    import yaml

    import mlops.params
    from pipelines import bundle as stage

    from conftest import REPO

    section = yaml.safe_load((REPO / "params.yaml").read_text())["bundle"]
    cfg = config_from_dict(BundleConfig, section)
    assert cfg.skip_policy.stage == "bench_adaptive" and isinstance(cfg.auto.tolerances["clipt"], float)
    with pytest.raises(ParamsError, match=r"auto: tolerances.clipt: expected a number, got 'x'"):
        config_from_dict(BundleConfig, {**section, "auto": {**section["auto"], "tolerances": {"clipt": "x"}}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"bundle": {**section, "base": {"path": "m"}}}))
    monkeypatch.setattr(mlops.params, "PARAMS_FILE", tmp_path / "params.yaml")
    with pytest.raises(SystemExit):
        stage.main()
    assert capsys.readouterr().err == (f"error: bundle: params file {tmp_path / 'params.yaml'}: section 'bundle': "
                                       "base lacks scheduler, steps\n")
