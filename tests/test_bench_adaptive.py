"""The bench_adaptive stage end to end on tiny random components (tiny profile, scratch dir)."""

import contextlib
import json
import sys
import types

import numpy as np
import pytest
import torch
import yaml

from benchmarks import bench_adaptive
from budgetdiff.domain.evaluators import domain_clip_model_cfg, save_attribute_checker, save_domain_clip
from conftest import REPO
from mlops.params import ParamsError, config_from_dict
from test_metrics_helpers import TINY_CLIP_CFG, tiny_checker, tiny_clip
from test_workflow import merge


@pytest.fixture()
def workspace(tmp_path, tiny_pipe, monkeypatch):
    tiny_pipe.save_pretrained(tmp_path / "models/base")  # not tiny_model_dir: its save time is shared
    model, _ = tiny_clip()
    save_domain_clip(model, domain_clip_model_cfg(TINY_CLIP_CFG), tmp_path / "models/clip")
    save_attribute_checker(tiny_checker(), tmp_path / "models/attributes")
    cfg = merge(yaml.safe_load((REPO / "params.yaml").read_text())["bench_adaptive"],
                yaml.safe_load((REPO / "params.tiny.yaml").read_text())["bench_adaptive"])
    cfg["model"] = "models/base"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"bench_adaptive": cfg}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path))  # no local AlexNet: LPIPS randinit
    return tmp_path, cfg


class FakeMlflow(types.ModuleType):
    """Records the calls main() makes; the real tracking store is exercised by test_workflow
    (importing mlflow and creating a SQLite store takes longer than this whole test)."""

    def __init__(self):
        super().__init__("mlflow")
        self.calls = []
        for name in ("set_tracking_uri", "set_experiment", "log_params", "log_metrics", "log_artifact"):
            setattr(self, name, lambda *args, _name=name, **kwargs: self.calls.append((_name, args)))

    @contextlib.contextmanager
    def start_run(self, **kwargs):
        self.calls.append(("start_run", kwargs.get("run_name")))
        yield


def test_main_writes_report_and_plot(workspace, capsys, monkeypatch):
    root, cfg = workspace
    fake = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    bench_adaptive.main()
    assert ("start_run", "bench_adaptive") in fake.calls and ("log_artifact", (cfg["report_path"],)) in fake.calls
    report = json.loads((root / cfg["report_path"]).read_text())
    assert (root / cfg["plot_path"]).read_bytes()[:4] == b"\x89PNG"
    assert set(report["schedulers"]) == {"ddim", "dpmpp", "euler"}
    assert report["lpips_backend"] == "mid/lpips_alex_randinit" and report["prompts"]["count"] == 2
    assert set(report["tuned_thresholds"]) == {"ddim", "dpmpp", "euler"}
    for scheduler, res in report["schedulers"].items():
        tuned = report["tuned_thresholds"][scheduler]
        assert tuned in cfg["tuning"]["candidates"]
        rows = {r["method"]: r for r in res["rows"]}
        kinds = {r["kind"] for r in res["rows"]}
        assert kinds == {"full", "adaptive", "adaptive_official", "adaptive_rawoutput", "uniform", "deepcache", "pab"}
        assert next(r for r in res["rows"] if r["kind"] == "adaptive_rawoutput")["params"]["reuse"] == "output"
        full = rows["full"]
        assert full["mean_nfe"] == cfg["steps"] and full["pixel/psnr"] == 100.0 and full["wall_speedup"] == 1.0
        assert full[report["lpips_backend"]] == pytest.approx(0.0, abs=1e-6)
        assert full["domain/attr_acc_vs_full"] == 1.0
        assert f"adaptive δ={tuned:g}" in rows and res["tuned_row"] in rows
        for r in res["rows"]:
            assert r["flops_per_image"] > 0 and np.isfinite(r["pixel/ssim"]) and "high/iclip_domainclip" in r
            if r["kind"].startswith("adaptive"):
                # FLOPs are one evaluation's times the mean NFE, sub-batches included
                assert r["flops_per_image"] == pytest.approx(res["flops_per_evaluation"] * r["mean_nfe"])
                assert 0 <= r["estimator_overhead_pct"] < 100 and len(r["skip_rate_by_step"]) == cfg["steps"]
        # DeepCache's cached steps run only the shallow branch: fewer FLOPs than full at full NFE
        deepcache = next(r for r in res["rows"] if r["kind"] == "deepcache")
        assert deepcache["mean_nfe"] == cfg["steps"] and deepcache["flops_per_image"] < full["flops_per_image"]
        assert set(res["equal_flops"]) >= {deepcache["method"], "pab"}
    assert set(report["targets"]) == {"ddim", "dpmpp", "euler"}
    oracle = report["oracle"]["prompts"][0]
    assert sum(oracle["oracle_mask"]) == sum(oracle["estimator_mask"]) == oracle["skips"]
    assert report["second_guidance"]["guidance"] == 7.5
    assert "tuned_thresholds" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_flops_counter_sees_attention_and_sub_batches(tiny_pipe):
    prompts = ["a small red circle at the top left on a white background"] * 3
    from budgetdiff.generation.flops import counting_unet_flops

    with counting_unet_flops(tiny_pipe.unet) as calls:
        tiny_pipe(prompts, num_inference_steps=2, guidance_scale=2.0, progress=False)
    with counting_unet_flops(tiny_pipe.unet) as one:
        tiny_pipe(prompts[:1], num_inference_steps=2, guidance_scale=2.0, progress=False)
    assert len(calls) == 2 and calls[0] == 3 * one[0] > 0  # linear in the batch


def test_random_admissible_mask_respects_constraints():
    import random

    rng = random.Random(0)
    for _ in range(20):
        mask = bench_adaptive.random_admissible_mask(20, 8, 4, 2, rng)
        assert sum(mask) == 8 and not any(mask[:4])
        assert bench_adaptive.longest_skip_run(mask) <= 2
    assert bench_adaptive.random_admissible_mask(8, 4, 4, 1, rng, tries=50) is None


def test_equal_flops_comparison_interpolates_the_adaptive_curve():
    name = "mid/lpips_alex"
    rows = [{"method": "full", "kind": "full", "flops_per_image": 100.0, name: 0.0},
            {"method": "a1", "kind": "adaptive", "flops_per_image": 50.0, name: 0.2},
            {"method": "u", "kind": "uniform", "flops_per_image": 75.0, name: 0.15},
            {"method": "p", "kind": "pab", "flops_per_image": 90.0, name: 0.01},
            {"method": "d", "kind": "deepcache", "flops_per_image": 40.0, name: 0.3}]
    out = bench_adaptive.equal_flops_comparison(rows, name)
    assert out["u"]["adaptive_lpips_at_equal_flops"] == pytest.approx(0.1) and out["u"]["adaptive_better"]
    assert out["p"]["adaptive_lpips_at_equal_flops"] == pytest.approx(0.04) and not out["p"]["adaptive_better"]
    assert out["d"]["adaptive_lpips_at_equal_flops"] is None and out["d"]["adaptive_better"] is None


def test_reuse_space_per_scheduler():
    per = {"ddim": "sample", "dpmpp": "epsilon"}
    assert bench_adaptive.reuse_for(per, "ddim") == "sample"
    assert bench_adaptive.reuse_for(per, "euler") == "epsilon"  # unlisted: the library default
    assert bench_adaptive.reuse_for("output", "dpmpp") == "output"
    section = {k: v for k, v in yaml.safe_load((REPO / "params.yaml").read_text())["bench_adaptive"].items()
               if k != "reuse"}
    cfg = config_from_dict(bench_adaptive.BenchAdaptiveConfig, {**section, "reuse": per, "max_skip": 3, "warmup": 5})
    config = bench_adaptive.Method("a", "adaptive", {"threshold": 0.1}).adaptive_config(cfg, "ddim")
    assert (config.reuse, config.max_skip, config.warmup) == ("sample", 3, 5)
    assert config_from_dict(bench_adaptive.BenchAdaptiveConfig, section).reuse == "epsilon"  # reuse left out
    with pytest.raises(ParamsError, match=r"reuse: expected"):
        config_from_dict(bench_adaptive.BenchAdaptiveConfig, {**section, "reuse": {"ddim": "noise"}})
