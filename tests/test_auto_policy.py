"""The calibrated auto policy: conformal bounds, the choice rule, the file format, the bundle, the
engine's routing by it, and the calibrate_auto stage on the tiny components."""

import json
import shutil

import numpy as np
import pytest

from budgetdiff.methods.auto_policy import AUTO_POLICY_FORMAT, AutoCandidate, AutoPolicy, AutoPolicyError, load_auto_policy
from budgetdiff.generation.engine import GenerationRequest, Generator

PROMPT = "a small red circle at the top left on a white background"


def _cand(name, kind, model, gflops, lower95, **kw):
    return AutoCandidate(name, kind, model, measured={"gflops_per_image": gflops,
                                                       "quality_lower_bound": {"0.95": lower95}}, **kw)


def synthetic_policy(default="base@3") -> AutoPolicy:
    """Made-up measurements: cheaper plans reach lower quality."""
    return AutoPolicy("ddim", 0.95, {"attr_acc": 0.01, "clipt": 0.005}, default, (
        _cand("student@4,w1", "uniform", "student", 1.0, 0.70, steps=4, guidance=1.0),
        _cand("base@3", "uniform", "base", 3.0, 0.80, steps=3),
        _cand("budget q'0.9", "budget", "base", 6.0, 0.90, budget_quality=0.9),
        _cand("base@10+skip", "uniform", "base", 8.0, 0.95, steps=10, skip=True),
        _cand("base@12", "uniform", "base", 12.0, 0.97, steps=12),
    ), reference={"model": "base", "steps": 20, "gflops_per_image": 20.0},
        source={"default_rule": "synthetic"})


def test_choice_rule():
    p = synthetic_policy()
    assert p.choose(None)[0].name == "base@3"
    assert p.choose(0.7)[0].name == "student@4,w1"
    assert p.choose(0.85)[0].name == "budget q'0.9"
    assert p.choose(0.95)[0].name == "base@10+skip"
    assert p.choose(0.96)[0].name == "base@12"
    cand, why = p.choose(0.99)
    assert cand is None and "reference plan" in why


def test_format_round_trip_and_errors(tmp_path):
    p = synthetic_policy()
    p.save(tmp_path / "a.json")
    q = load_auto_policy(tmp_path / "a.json")
    assert q.to_dict() == p.to_dict() and q.sha256 == p.sha256
    d = p.to_dict()
    with pytest.raises(AutoPolicyError, match="not a budgetdiff-auto-policy/1"):
        AutoPolicy.from_dict({**d, "format": "x"})
    with pytest.raises(AutoPolicyError, match="no candidate named 'nope'"):
        AutoPolicy.from_dict({**d, "default": "nope"})
    bad = json.loads(json.dumps(d))
    bad["candidates"][2]["budget_epsilon"] = 0.1  # both rules
    with pytest.raises(AutoPolicyError, match="exactly one of"):
        AutoPolicy.from_dict(bad)
    with pytest.raises(AutoPolicyError, match="does not exist"):
        load_auto_policy(tmp_path / "missing.json")
    assert d["format"] == AUTO_POLICY_FORMAT


def bundle_with_policy(tiny_bundle_dir, out):
    """A copy of the tiny bundle at ``out`` with the synthetic auto policy embedded in bundle.json
    (its model paths made absolute, so the copy loads from anywhere)."""
    shutil.copytree(tiny_bundle_dir, out)
    raw = json.loads((out / "bundle.json").read_text())
    for key in ("base", "student", "budget"):
        raw[key]["path"] = str((tiny_bundle_dir / raw[key]["path"]).resolve())
    raw["auto"]["policy"] = synthetic_policy().to_dict()
    (out / "bundle.json").write_text(json.dumps(raw))
    return out


@pytest.fixture()
def policy_bundle(tiny_bundle_dir, tmp_path):
    """The tiny bundle with the synthetic auto policy embedded in bundle.json."""
    return bundle_with_policy(tiny_bundle_dir, tmp_path / "bundle")


def test_engine_routes_auto_by_the_policy_and_records_it(policy_bundle):
    gen = Generator.load(policy_bundle)
    assert gen.auto_policy is not None and gen.bundle.auto.policy.default == "base@3"
    reqs = [GenerationRequest(PROMPT, mode="auto", seed=1),
            GenerationRequest(PROMPT, mode="auto", seed=2, quality_target=0.7),
            GenerationRequest(PROMPT, mode="auto", seed=3, quality_target=0.85),
            GenerationRequest(PROMPT, mode="auto", seed=4, quality_target=0.99)]
    plans = gen.plan(reqs)
    assert (plans[0].model, plans[0].steps) == ("base", 3)
    assert (plans[1].model, plans[1].steps, plans[1].guidance) == ("student", 4, 1.0)
    assert plans[2].model == "base" and plans[2].budget.rule["name"] == "quality_target"
    assert plans[2].steps == plans[2].budget.chosen_steps
    assert (plans[3].model, plans[3].steps) == ("base", 20) and plans[3].route.route == "reference"
    skip = gen.plan([GenerationRequest(PROMPT, mode="auto", quality_target=0.95)])[0]
    assert (skip.model, skip.steps) == ("base", 10) and skip.skip is not None
    assert skip.skip_source["point"] == gen.skip_policy.for_scheduler("ddim").default
    results = gen(reqs[:2], output_type="np")
    auto = results[0].record.to_dict()["policy"]["auto"]
    assert auto["route"] == "base@3" and auto["policy"]["sha256"] == gen.auto_policy.sha256
    assert auto["policy"]["path"].endswith("bundle.json#auto.policy")
    assert results[1].record.model.name == "student" and results[1].record.steps == 4
    # an explicit guidance still wins over the candidate's
    plan = gen.plan([GenerationRequest(PROMPT, mode="auto", guidance=3.0)])[0]
    assert plan.guidance == 3.0


def test_a_bad_embedded_policy_is_one_bundle_error(policy_bundle):
    from budgetdiff.generation.bundle import BundleError, load_bundle

    raw = json.loads((policy_bundle / "bundle.json").read_text())
    raw["auto"]["policy"]["coverage"] = 2
    (policy_bundle / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="coverage must be in"):
        load_bundle(policy_bundle)


def test_calibrate_auto_stage_on_tiny_components(tiny_bundle_dir, tmp_path, monkeypatch):
    """The stage end to end on the tiny models: every candidate measured, the default picked by the
    rule, conformal bounds present, a resumed run reads its cache."""
    from dataclasses import replace

    import torch

    import pipelines.calibrate_auto as stage
    from mlops.params import config_from_dict
    from test_metrics_helpers import tiny_backbone, tiny_checker

    monkeypatch.setattr("budgetdiff.metrics.semantic.load_clip_backbone", lambda *a, **k: tiny_backbone())
    monkeypatch.setattr("budgetdiff.domain.evaluators.load_attribute_checker", lambda *a, **k: tiny_checker())
    root = tiny_bundle_dir.parent
    cfg = config_from_dict(stage.CalibrateAutoConfig, {
           "base": str(root / "base"), "student": str(root / "student"), "student_steps": 4,
           "budget": str(root / "budget"), "clip_dir": "unused", "attributes_dir": "unused", "scheduler": "ddim",
           "reference_steps": 6, "prompts": 12, "seed_offset": 5000, "count_weights": [0.5, 0.5, 0, 0],
           "batch_size": 8, "torch_threads": 1,
           "candidates": {"base_steps": [2, 3], "base_steps_skip": [8], "student_guidance": [1.0],
                          "budget_quality": [0.9], "budget_plateau": [0.1]},
           "skip_policy": {"policy": str(root / "bundle" / "skip_policy.json")},
           "tolerances": {"attr_acc": 1.0, "clipt": 1.0}, "se_margin": 0.0, "coverage": 0.8,
           "coverages": [0.8, 0.9], "cache_dir": str(tmp_path / "cache"), "output_dir": "unused",
           "report_path": "unused", "plot_path": "unused"})
    before = torch.get_num_threads()
    try:
        policy, report = stage.run(cfg)
        again, _ = stage.run(cfg)  # every candidate from the cache
    finally:
        torch.set_num_threads(before)
    names = [c.name for c in policy.candidates]
    assert names == ["base@2", "base@3", "base@8+skip", "student@4,w1", "budget q'0.9", "budget eps0.1"]
    skip = policy.candidate("base@8+skip")
    assert skip.skip and skip.measured["mean_nfe"] < 8  # the skip policy skipped something
    cheapest = min(policy.candidates, key=lambda c: c.measured["gflops_per_image"])
    assert policy.default == cheapest.name  # tolerances of 1.0: every candidate qualifies
    for c in policy.candidates:
        m = c.measured
        assert m["n"] == 12 and set(m["quality_lower_bound"]) == {"0.8", "0.9"}
        assert m["quality_lower_bound"]["0.9"] <= m["quality_lower_bound"]["0.8"] <= m["quality_mean"] + 1e-9
    assert policy.reference["steps"] == 6 and again.to_dict()["candidates"] == policy.to_dict()["candidates"]
    with pytest.raises(stage.CalibrateAutoError, match="coverage"):
        stage.run(replace(cfg, coverage=0.5))
    with pytest.raises(stage.CalibrateAutoError, match="no candidate keeps"):
        stage.select_default(policy.candidates, stage.TolerancesConfig(attr_acc=-1.0, clipt=-1.0), 0.0)
    assert policy.tolerances == {"attr_acc": 1.0, "clipt": 1.0}


def test_calibrate_auto_config_and_cache_key():
    """The params section read once (the bundle's skip policy when it names none); the key of a
    candidate's cached renders is what it was with the dict config, so a rerun still resumes."""
    from dataclasses import replace

    import pipelines.calibrate_auto as stage
    from conftest import REPO
    from mlops.params import ParamsError, config_from_dict, load_config

    cfg = load_config("calibrate_auto", stage.CalibrateAutoConfig, REPO / "params.yaml")
    assert cfg.skip_policy is None and cfg.torch_threads is None and cfg.coverage in cfg.coverages
    bundle = load_config("bundle", stage.BundleConfig, REPO / "params.yaml")
    assert stage.load_stage_config(REPO / "params.yaml") == replace(cfg, skip_policy=bundle.skip_policy)
    names = [c.name for c in stage.candidates_from_params(cfg.candidates, cfg.student_steps)]
    assert names[0] == f"base@{cfg.candidates.base_steps[0]}" and len(names) == len(set(names))
    assert stage.candidates_from_params(stage.CandidatesConfig(student_guidance=[1.0, 1.25]), 8)[1].name == \
        "student@8,w1.25"
    with pytest.raises(ParamsError, match=r"candidates: unknown key base_step \(known: base_steps"):
        config_from_dict(stage.CandidatesConfig, {"base_step": [4]}, "candidates")
    # pinned with the dict config: content_sha256([model_key, name, prompts, seeds, cfg["batch_size"]])
    assert stage.cache_key(["a", "b", "c"], "base@4", ["p1", "p2"], [1, 2], 16) == "af8a15f0e6d684ed"
