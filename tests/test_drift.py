"""Prompt drift (budgetdiff/statistics/drift.py, monitoring/drift.py, ``budgetdiff drift``): the statistics on
constructed Gaussian data, the windows, the reference prompts, the CLI and the serving glue."""

from __future__ import annotations

import json
import threading
import time
import zlib
from itertools import combinations

import numpy as np
import pytest
import torch
import yaml

from budgetdiff.statistics import drift
from budgetdiff.cli import main
from budgetdiff.statistics.drift import (
    C2STResult,
    DriftMonitor,
    DriftResult,
    MMDResult,
    classifier_two_sample_test,
    mann_whitney_pvalue,
    median_bandwidth,
    mmd_permutation_test,
    read_prompt_log,
    reference_prompts,
    window_slices,
)
from budgetdiff.domain.prompt_table import scene_prompt_rows
from conftest import REPO

PARAMS = REPO / "params.yaml"


def gaussians(seed, n=40, m=40, d=5, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), shift + scale * rng.standard_normal((m, d))


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------
def test_mmd_statistic_is_the_unbiased_estimate():
    x, y = gaussians(0, n=7, m=9, d=3, shift=0.3)
    h = 1.3
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * h * h))  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    xy = sum(k(a, b) for a in x for b in y) / (7 * 9)
    result = mmd_permutation_test(x, y, n_permutations=19, bandwidth=h)
    assert result.statistic == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert (result.n_x, result.n_y, result.n_permutations, result.bandwidth) == (7, 9, 19, h)
    z = np.concatenate([x, y])
    pairs = [np.linalg.norm(z[i] - z[j]) for i, j in combinations(range(len(z)), 2)]
    assert median_bandwidth(z) == pytest.approx(np.median(pairs))
    assert mmd_permutation_test(x, y, n_permutations=19).bandwidth == pytest.approx(np.median(pairs))


def test_same_distribution_pvalues_are_roughly_uniform():
    """50 seeds without drift: at level 0.05 each test rejects ~2.5 times; P(>= 8) < 0.002."""
    mmd_p, c2st_p, aucs = [], [], []
    for seed in range(50):
        x, y = gaussians(seed)
        mmd_p.append(mmd_permutation_test(x, y, n_permutations=199, seed=seed).p_value)
        c = classifier_two_sample_test(x, y, seed=seed)
        c2st_p.append(c.p_value)
        aucs.append(c.auc)
    for p in (np.array(mmd_p), np.array(c2st_p)):
        assert (p < 0.05).sum() <= 7, p
        assert 0.35 < p.mean() < 0.65, p.mean()       # uniform: mean 0.5, sd of the mean 0.04
        assert (p > 0.5).sum() >= 15                  # not piled up at small values
    assert abs(np.mean(aucs) - 0.5) < 0.05


def test_shifted_mean_is_detected_by_both_tests():
    x, y = gaussians(1, n=100, m=100, d=10, shift=0.5)
    assert mmd_permutation_test(x, y, n_permutations=499).p_value < 0.01
    c = classifier_two_sample_test(x, y)
    assert c.p_value < 0.01 and c.auc > 0.7


def test_shifted_covariance_is_detected_by_mmd():
    x, y = gaussians(2, n=100, m=100, d=5, scale=1.6)       # same mean, variance x2.56
    assert abs(x.mean() - y.mean()) < 0.2
    assert mmd_permutation_test(x, y, n_permutations=499).p_value < 0.01


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_c2st_auc_chance_when_same_high_when_separable(backend):
    if backend == "sklearn":
        pytest.importorskip("sklearn")
    same = [classifier_two_sample_test(*gaussians(s, n=60, m=60), seed=s, backend=backend).auc for s in range(10)]
    assert abs(np.mean(same) - 0.5) < 0.08
    sep = classifier_two_sample_test(*gaussians(3, n=60, m=60, shift=1.5), backend=backend)
    assert sep.auc > 0.8 and sep.p_value < 1e-4 and sep.accuracy > 0.7 and sep.backend == backend


def test_c2st_balances_classes_and_backends_agree():
    x, y = gaussians(4, n=200, m=30, shift=1.0)
    c = classifier_two_sample_test(x, y, seed=0, backend="torch")
    assert c.n_per_class == 30 and c.n_train + c.n_test == 60 and c.n_test == 30
    pytest.importorskip("sklearn")
    s = classifier_two_sample_test(x, y, seed=0, backend="sklearn")
    assert s.auc == pytest.approx(c.auc, abs=1e-6) and s.p_value == pytest.approx(c.p_value, rel=1e-4)  # same objective and split


def test_pvalues_are_bounded_and_never_zero():
    x, y = gaussians(5, n=30, m=30, shift=50.0)  # as far apart as it gets
    r = mmd_permutation_test(x, y, n_permutations=9, seed=0)
    assert r.p_value == pytest.approx(1 / 10)      # (1 + 0) / (1 + 9): the observed labelling counts
    x, y = gaussians(6, n=30, m=30)
    for seed in range(5):
        p = mmd_permutation_test(x, y, n_permutations=9, seed=seed).p_value
        assert 0.1 <= p <= 1.0 and abs(p * 10 - round(p * 10)) < 1e-9
    same = np.ones((10, 3))
    assert mmd_permutation_test(same, same, n_permutations=9).p_value == 1.0  # every relabelling ties
    labels = np.array([0] * 50 + [1] * 50)
    assert 0 < mann_whitney_pvalue(labels, np.arange(100.0)) < 1e-12       # perfect separation
    assert mann_whitney_pvalue(labels, np.arange(100.0)[::-1]) > 0.999    # one-sided: below chance is no drift
    assert mann_whitney_pvalue(labels, np.zeros(100)) == 1.0              # all tied
    assert 0 < mann_whitney_pvalue(np.array([0] * 5000 + [1] * 5000), np.arange(10000.0)) <= 1e-300


def test_bad_inputs_raise_value_errors():
    x, y = gaussians(0)
    with pytest.raises(ValueError, match="dimensions"):
        mmd_permutation_test(x, y[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        mmd_permutation_test(np.full((4, 2), np.nan), y[:, :2])
    with pytest.raises(ValueError, match="n_permutations"):
        mmd_permutation_test(x, y, n_permutations=0)
    with pytest.raises(ValueError, match="bandwidth"):
        mmd_permutation_test(x, y, bandwidth=0.0)
    with pytest.raises(ValueError, match="at least 4"):
        classifier_two_sample_test(x[:3], y)
    with pytest.raises(ValueError, match="backend"):
        classifier_two_sample_test(x, y, backend="xgboost")


def test_results_are_deterministic_per_seed():
    x, y = gaussians(7, shift=0.2)
    assert mmd_permutation_test(x, y, seed=3) == mmd_permutation_test(x, y, seed=3)
    assert classifier_two_sample_test(x, y, seed=3) == classifier_two_sample_test(x, y, seed=3)
    assert torch.is_tensor(torch.as_tensor(x))  # tensors are accepted too
    assert mmd_permutation_test(torch.as_tensor(x), torch.as_tensor(y), seed=3) == mmd_permutation_test(x, y, seed=3)


# ------------------------------------------------------------------------------------------------
# Windows and the monitor
# ------------------------------------------------------------------------------------------------
def test_window_slices():
    assert window_slices(250, 100) == [slice(0, 100), slice(100, 200), slice(200, 250)]
    assert window_slices(205, 100) == [slice(0, 100), slice(100, 200)]        # a tail of 5 is left out
    assert window_slices(30, 100) == [slice(0, 30)]                           # a short log is one window
    assert window_slices(10, 10) == [slice(0, 10)]
    with pytest.raises(ValueError, match="at least 10"):
        window_slices(9, 100)
    with pytest.raises(ValueError, match="window"):
        window_slices(100, 9)


def _result(p_mmd, p_c2st, alpha=0.01):
    return DriftResult(0, 50, 50, MMDResult(0.0, p_mmd, 1.0, 50, 50, 999),
                       C2STResult(0.5, p_c2st, 0.5, 50, 50, 50, "torch"), alpha=alpha)


def test_flag_is_bonferroni_over_the_two_tests():
    assert _result(0.5, 0.004).flagged and _result(0.004, 0.5).flagged
    assert not _result(0.006, 0.006).flagged            # each test at alpha / 2 = 0.005
    assert _result(0.006, 0.5).p_value == pytest.approx(0.012)
    assert _result(0.04, 0.5, alpha=0.1).flagged and _result(0.9, 0.9).p_value == 1.0
    record = _result(0.5, 0.004).to_record()
    assert record["flagged"] is True and record["correction"] == "bonferroni" and record["alpha"] == 0.01


def test_drift_monitor_windows_and_detection():
    rng = np.random.default_rng(0)
    table = {}

    def embed(prompts):  # each "prompt" names its distribution and index
        return np.stack([table[p] for p in prompts])

    for i in range(400):
        table[f"in{i}"] = rng.standard_normal(6)
        table[f"out{i}"] = rng.standard_normal(6) + 1.0
    reference = [f"in{i}" for i in range(200, 400)]
    monitor = DriftMonitor(reference, embed=embed, window=50, n_permutations=199, seed=0)
    assert monitor.reference.shape == (200, 6) and monitor.pending == 0
    assert monitor.add([f"in{i}" for i in range(30)]) == [] and monitor.pending == 30
    results = monitor.add([f"in{i}" for i in range(30, 130)])
    assert [r.window_index for r in results] == [0, 1] and monitor.pending == 30
    assert all(r.n_prompts == 50 and r.n_reference == 200 for r in results)
    assert not any(r.flagged for r in results)
    shifted = monitor.add([f"out{i}" for i in range(20)] + [f"out{i}" for i in range(20, 90)])  # 30 + 90 pending
    assert len(shifted) == 2 and monitor.pending == 20 and shifted[1].flagged
    assert shifted[1].mmd.p_value == pytest.approx(1 / 200) and shifted[1].c2st.auc > 0.8
    assert [r.window_index for r in monitor.results] == [0, 1, 2, 3]
    one = monitor.test([f"out{i}" for i in range(12)], window_index=99)
    assert one.n_prompts == 12 and one.window_index == 99 and len(monitor.results) == 4
    with pytest.raises(ValueError, match="window"):
        DriftMonitor(reference, embed=embed, window=5)
    with pytest.raises(ValueError, match="alpha"):
        DriftMonitor(reference, embed=embed, alpha=1.5)


# ------------------------------------------------------------------------------------------------
# The reference prompts
# ------------------------------------------------------------------------------------------------
def test_reference_prompts_are_the_prompts_stage_train_split(tmp_path):
    from mlops.params import config_from_dict
    from pipelines.prompts import PromptsConfig, build_prompts

    params = yaml.safe_load(PARAMS.read_text())
    frame, _ = build_prompts(config_from_dict(PromptsConfig, params["prompts"]))
    assert frame.to_dict("records") == drift.prompt_table(params)
    expected = frame.loc[frame["split"] == params["train_budget"]["train_split"], "prompt"].tolist()
    assert reference_prompts(PARAMS) == expected and len(expected) == 128
    # a user's prompt file as the source: the same table too
    lines = [f"a photo of thing number {i} " + "word " * (i % 7) for i in range(30)]
    lines[3] = "a small red circle at the top left on a white background"
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n\n")
    cfg = {**params["prompts"], "source": str(tmp_path / "p.txt"), "n_prompts": 25}
    frame, _ = build_prompts(config_from_dict(PromptsConfig, cfg))
    assert frame.to_dict("records") == drift.prompt_table({"prompts": cfg})
    with pytest.raises(ValueError, match="does not exist"):
        reference_prompts(tmp_path / "none.yaml")


# ------------------------------------------------------------------------------------------------
# Prompt logs and the CLI
# ------------------------------------------------------------------------------------------------
def hashed_words(prompts, dim=48):
    """A cheap deterministic embedding: the normalised sum of one random vector per word."""
    out = np.zeros((len(prompts), dim))
    for i, p in enumerate(prompts):
        for w in p.lower().replace(",", " ").split():
            out[i] += np.random.default_rng(zlib.crc32(w.encode())).standard_normal(dim)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def scene_prompts(n, offset=70_000_000):
    return [r["prompt"] for r in scene_prompt_rows(n, [0.25] * 4, offset)]


@pytest.fixture
def fake_embedder(monkeypatch):
    monkeypatch.setattr(drift, "default_embedder", lambda progress=False: hashed_words)


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_read_prompt_log(tmp_path):
    (tmp_path / "a.txt").write_text("first  prompt\n\n  second\nfirst  prompt\n")
    assert read_prompt_log(tmp_path / "a.txt") == (["first prompt", "second", "first prompt"], 0)
    (tmp_path / "b.jsonl").write_text('{"prompt": "x y"}\n{"steps": 3}\nnot json\n[1]\n{"prompt": 5}\n\n{"prompt": "z"}\n')
    assert read_prompt_log(tmp_path / "b.jsonl") == (["x y", "z"], 4)
    for name, content, message in (("c.csv", "prompt\nx\n", "unknown extension"), ("d.txt", "\n  \n", "no prompt"),
                                   ("e.jsonl", '{"a": 1}\n', "no prompt"), ("missing.txt", None, "does not exist")):
        if content is not None:
            (tmp_path / name).write_text(content)
        with pytest.raises(drift.PromptLogError, match=message):
            read_prompt_log(tmp_path / name)


def test_cli_drift_report_txt_and_jsonl(tmp_path, capsys, fake_embedder):
    inside = scene_prompts(60)
    ood = [f"a photo of a dog number {i} playing in a sunny park with children" for i in range(40)]
    (tmp_path / "log.txt").write_text("\n".join(inside + ood) + "\n")
    out = tmp_path / "report.html"
    code, stdout, err = run_cli(["drift", tmp_path / "log.txt", "--out", out, "--window", 50, "--params", PARAMS,
                                 "--permutations", 199], capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["prompts"] == 100 and summary["windows"] == 2 and summary["reference_prompts"] == 128
    assert summary["flagged_windows"] == 1 and summary["drift"] is True and summary["alpha"] == 0.01
    assert summary["min_mmd_pvalue"] == pytest.approx(1 / 200) and summary["most_out_of_distribution"] in ood
    page = out.read_text()
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page and "Most out-of-distribution" in page
    assert "http://" not in page and "https://" not in page                       # self-contained
    assert not list(tmp_path.glob(".report.html.*"))                               # no temporary left

    records = [json.dumps({"prompt": p, "steps": 10}) for p in inside[:45]] + ["{truncated"]
    (tmp_path / "log.jsonl").write_text("\n".join(records) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(scene_prompts(80, offset=60_000_000)) + "\n")
    code, stdout, err = run_cli(["drift", tmp_path / "log.jsonl", "--out", out, "--window", 20,
                                 "--reference", tmp_path / "ref.txt", "--permutations", 99], capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert (summary["prompts"], summary["windows"], summary["left_over"]) == (45, 2, 5)
    assert summary["reference_prompts"] == 80 and "skipped 1 line" in err


@pytest.mark.parametrize("case, flag", [
    ("missing", "PROMPT_LOG"), ("empty", "PROMPT_LOG"), ("few", "PROMPT_LOG"), ("csv", "PROMPT_LOG"),
    ("window", "--window"), ("alpha", "--alpha"), ("permutations", "--permutations"), ("out_png", "--out"),
    ("out_dir", "--out"), ("params", "--params"), ("reference", "--reference"), ("no_out", "--out"),
])
def test_cli_drift_bad_inputs_one_line_exit_2(case, flag, tmp_path, capsys, fake_embedder):
    log = tmp_path / "log.txt"
    log.write_text("\n".join(scene_prompts(30)) + "\n")
    out = tmp_path / "r.html"
    args = {"missing": [tmp_path / "nope.txt", "--out", out],
            "empty": [tmp_path / "empty.txt", "--out", out],
            "few": [tmp_path / "few.jsonl", "--out", out],
            "csv": [tmp_path / "log.csv", "--out", out],
            "window": [log, "--out", out, "--window", 9],
            "alpha": [log, "--out", out, "--alpha", 0],
            "permutations": [log, "--out", out, "--permutations", 0],
            "out_png": [log, "--out", tmp_path / "r.png"],
            "out_dir": [log, "--out", tmp_path / "no" / "r.html"],
            "params": [log, "--out", out, "--params", tmp_path / "none.yaml"],
            "reference": [log, "--out", out, "--reference", tmp_path / "none.txt"],
            "no_out": [log]}[case]
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "few.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in scene_prompts(5)))
    (tmp_path / "log.csv").write_text("prompt\nx\n")
    code, stdout, err = run_cli(["drift", *args], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0], err
    assert "Traceback" not in err and stdout == "" and not out.exists()


# ------------------------------------------------------------------------------------------------
# MiniLM end to end (the real embedding; no trained weights beyond the encoder)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    return drift.MiniLMEmbedder(batch_size=64)


def test_minilm_embeddings_separate_out_of_domain_prompts(minilm):
    from budgetdiff.text import encode_prompts
    from monitoring.drift import out_of_domain_prompts

    reference = reference_prompts(PARAMS)
    ood = out_of_domain_prompts(30)
    inside = scene_prompts(30, offset=70_000_000)
    emb = minilm(inside[:3])
    assert emb.shape == (3, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    encoder, tokenizer = minilm._load()
    assert np.allclose(emb, encode_prompts(inside[:3], encoder, tokenizer).pooled.numpy(), atol=1e-6)
    monitor = DriftMonitor(reference, embed=minilm, window=30, n_permutations=499)
    assert not monitor.test(inside).flagged
    result = monitor.test(ood)
    assert result.flagged and result.mmd.p_value < 0.01 and result.c2st.p_value < 0.01 and result.c2st.auc > 0.95


# ------------------------------------------------------------------------------------------------
# The serving glue
# ------------------------------------------------------------------------------------------------
def test_serving_monitor_sets_the_named_gauges():
    from monitoring import drift as glue
    from monitoring.names import BY_NAME

    assert set(glue.GAUGES) == {n for n in BY_NAME if n.startswith("budgetdiff_drift_")}
    calls = []
    monitor = glue.ServingDriftMonitor(scene_prompts(120, offset=60_000_000), set_gauge=lambda n, v: calls.append((n, v)),
                                       embed=hashed_words, window=40, n_permutations=99)
    started = [monitor.observe(p) for p in scene_prompts(40)]
    assert started == [False] * 39 + [True]
    assert monitor.wait(30) and monitor.windows_tested == 1 and monitor.errors == 0, monitor.last_error
    assert [n for n, _ in calls] == list(glue.GAUGES) and all(BY_NAME[n].kind == "gauge" for n, _ in calls)
    values = dict(calls)
    assert values[glue.WINDOW_PROMPTS] == 40 and 0 < values[glue.MMD_PVALUE] <= 1 and 0 < values[glue.C2ST_PVALUE] <= 1
    assert 0 <= values[glue.C2ST_AUC] <= 1 and not monitor.last_result.flagged
    calls.clear()
    assert monitor.observe_many([f"a photo of a dog number {i} playing in a park" for i in range(40)]) == 1
    assert monitor.wait(30) and monitor.windows_tested == 2
    assert dict(calls)[glue.MMD_PVALUE] == pytest.approx(1 / 100) and monitor.last_result.flagged
    assert monitor.stats()["last"]["window"] == 1


def test_serving_monitor_is_bounded_and_non_blocking():
    from monitoring.drift import ServingDriftMonitor

    release = threading.Event()

    def slow_embed(prompts):
        release.wait(30)
        return hashed_words(prompts)

    monitor = ServingDriftMonitor(scene_prompts(40, offset=60_000_000), embed=slow_embed, window=20, n_permutations=19)
    t0 = time.perf_counter()
    started = monitor.observe_many([f"prompt {i}" for i in range(5000)])
    elapsed = time.perf_counter() - t0
    assert started == 1 and monitor.busy and len(monitor) == 20 and monitor.observed == 5000
    assert elapsed < 2.0                                          # the test runs in the background
    assert list(monitor._buffer) == [f"prompt {i}" for i in range(4980, 5000)]
    release.set()
    assert monitor.wait(30) and monitor.windows_tested == 1
    monitor.observe("one more")                                 # the overdue window starts now
    assert monitor.wait(30) and monitor.windows_tested == 2 and monitor.windows_skipped == 249 - 1


def test_serving_monitor_survives_failures():
    from monitoring.drift import ServingDriftMonitor

    def broken_gauge(name, value):
        raise RuntimeError("exporter down")

    monitor = ServingDriftMonitor(scene_prompts(40, offset=60_000_000), set_gauge=broken_gauge, embed=hashed_words,
                                  window=10, n_permutations=19)
    monitor.observe_many(scene_prompts(10))
    assert monitor.wait(30) and monitor.windows_tested == 1 and monitor.errors == 4
    bad = ServingDriftMonitor(scene_prompts(40, offset=60_000_000), embed=lambda p: np.zeros((len(p), 0)), window=10)
    bad.observe_many(scene_prompts(10))
    assert bad.wait(30) and bad.errors == 1 and bad.windows_tested == 0 and bad.last_error


def test_drift_benchmark_small(fake_embedder):
    from monitoring.drift import drift_benchmark, out_of_domain_prompts
    from budgetdiff.domain.scenes import PromptParseError, parse_prompt

    ood = out_of_domain_prompts(100)
    assert len(set(ood)) == 100
    for p in ood:
        with pytest.raises(PromptParseError):
            parse_prompt(p)
    report = drift_benchmark(PARAMS, embed=hashed_words, window=30, n_windows=6, n_permutations=199, shift_windows=2)
    assert report["out_of_domain"]["pass"] and report["out_of_domain"]["prompts"] == 30
    held = report["in_domain"]
    assert held["windows"] == 6 and held["window"] == 30 and 0 <= held["false_positive_rate"] <= 1
    assert held["seed_range"][0] >= 70_000_000 and report["reference"]["seed_range"][1] < 70_000_000
    assert report["seconds"]["prompts_embedded"] == 128 + 180 + 60 + 30 and report["pass"] == (
        report["out_of_domain"]["pass"] and held["pass"])
    with pytest.raises(ValueError, match="disjoint"):
        drift_benchmark(PARAMS, embed=hashed_words, window=10, n_windows=2, heldout_seed_offset=60_000_000)


def test_no_mlflow_ray_or_dvc_imports():
    """budgetdiff/ never imports them; monitoring/drift.py stays testable without Ray."""
    import ast

    for path in (REPO / "budgetdiff" / "statistics" / "drift.py", REPO / "monitoring" / "drift.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] in ("mlflow", "ray", "dvc")], (path, names)
