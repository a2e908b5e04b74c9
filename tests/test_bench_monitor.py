"""bench_monitor's pieces that need no cluster: the degraded bundle, params checks, the report's
headline and plot (the run itself is the DVC stage: a Serve cluster and Prometheus under load)."""

import pytest
import yaml

from benchmarks import bench_monitor as bm
from conftest import REPO
from mlops.params import config_from_dict
from test_auto_policy import bundle_with_policy


def test_degraded_bundle_routes_every_auto_request_to_the_cheap_plan(tiny_bundle_dir, tmp_path):
    from budgetdiff.generation.engine import GenerationRequest, Generator

    src = bundle_with_policy(tiny_bundle_dir, tmp_path / "src")
    out = bm.degraded_bundle(str(src), tmp_path / "bad", steps=2)
    gen = Generator.load(out)
    for q in (None, 0.5, 0.99):
        plan = gen.plan([GenerationRequest("a small red circle at the top left on a white background",
                                           mode="auto", quality_target=q)])[0]
        assert (plan.model, plan.steps) == ("base", 2)
    with pytest.raises(bm.BenchMonitorError, match="no calibrated auto policy"):
        bm.degraded_bundle(str(tiny_bundle_dir), tmp_path / "bad2", steps=2)


def _cfg(**over):
    """params.yaml's bench_monitor section as its config, with ``phase.key`` values replaced."""
    cfg = yaml.safe_load((REPO / "params.yaml").read_text())["bench_monitor"]
    cfg["latency"].update(blocks=6, sample_rate=0.1)
    cfg["slo"].update(quality_target=0.85, normal_requests=8, degraded_max_requests=8, concurrency=2)
    for k, v in over.items():
        cfg[k.split(".")[0]][k.split(".")[1]] = v
    return config_from_dict(bm.BenchMonitorConfig, cfg)


@pytest.mark.parametrize("key, value, match", [("latency.blocks", 3, "even number"),
                                               ("latency.sample_rate", 0, r"\(0, 1\]"),
                                               ("slo.quality_target", 1.5, r"\(0, 1\]"),
                                               ("slo.concurrency", 0, ">= 1")])
def test_bad_params_are_one_line_errors(key, value, match):
    bm.check_params(_cfg())
    with pytest.raises(bm.BenchMonitorError, match=match):
        bm.check_params(_cfg(**{key: value}))


def test_headline_and_plot_from_a_report():
    report = {
        "latency": {"sample_rate": 0.1, "p95_ratio_on_off": 1.02, "target": {"met": True},
                    "_latencies": {"off": [1.0, 1.1, 1.2], "on": [1.0, 1.2, 1.3]}},
        "slo": {"quality_target": 0.85, "t_degraded": 60.0,
                "normal": {"shadow": {"share_good": 0.97}},
                "degraded": {"shadow": {"share_good": 0.05}, "fast_burn_fired": True,
                             "fired_after_sampled_requests": 120},
                "target": {"normal_silent": True, "met": True},
                "timeline": [{"t": 10.0, "share_good": 0.97, "alerts": []},
                             {"t": 200.0, "share_good": 0.4, "alerts": [["BudgetdiffQualityBurnFast", "firing"]]}]},
        "drift": {"alpha": 0.01, "pass": True,
                  "out_of_domain": {"mmd_pvalue": 0.001, "c2st_pvalue": 1e-10, "flagged": True},
                  "in_domain": {"false_positive_rate": 0.0, "window_pvalues": [0.5, 0.3, 0.9]}},
    }
    h = bm.headline(report)
    assert h["quality_alert_fired_after_sampled_requests"] == 120 and h["drift_target_met"]
    assert bm.plot(report)[:8] == b"\x89PNG\r\n\x1a\n"
