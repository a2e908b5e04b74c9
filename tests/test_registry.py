"""The MLflow model registry (registry/): register, the promotion gate, rollback, loading
``models:/budgetdiff@champion`` in a fresh process, concurrent registrations, ``mlflow server``.

Everything runs on tiny bundles (tests/conftest.py) in a temporary sqlite registry; the gate's
thresholds are synthetic (``GATE``), not today's params."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_tiny_bundle, tiny_skip_policy

GATE = {
    "prompts": 4, "seed_offset": 95_000_000, "mode": "auto", "batch_size": 8,
    "promise": {"quality_targets": [0.9], "coverage_z": 1.645, "fidelity_z": 1.96},
    "rules": {"auto": {
        "floors": {"domain/attr_acc": 0.0, "cost/gflops_per_image": 1000.0},
        "max_worse": {"high/clipt_domainclip": 0.05, "domain/attr_acc": 0.1},
        "max_worse_pct": {"cost/gflops_per_image": 5.0, "cost/mean_nfe": 5.0},
    }},
}
PROMPT = "a small red circle at the top left on a white background"


def _env(uri: str, cache: Path) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "BUDGETDIFF_REGISTRY_CACHE": str(cache),
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: two-thread OpenMP on a shared 2-core machine spins instead of working."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    from test_metrics_helpers import tiny_backbone, tiny_checker

    from budgetdiff.metrics import MetricScorer, ScoringConfig
    from budgetdiff.metrics.perceptual import LpipsMetric

    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path_factory.mktemp("hub")))  # no ImageNet AlexNet: the randinit backend
    try:
        lpips = LpipsMetric()
    finally:
        torch.hub.set_dir(previous)
    return MetricScorer(ScoringConfig(batch_size=64), lpips=lpips, clip=tiny_backbone(), checker=tiny_checker())


def tiny_auto_policy(route_targets_to_steps: int = 20) -> dict:
    """A calibrated auto policy for the tiny bundle (base steps 20). Its default plan is the base
    model at its full 20 steps, so it keeps the prompt fidelity it promises; a quality_target is
    routed to the base model at ``route_targets_to_steps`` steps, which claims a 95 % lower bound
    of 0.999: true at 20 steps (the reference itself), false at 1 step."""
    from budgetdiff.methods.auto_policy import AUTO_POLICY_FORMAT

    def cand(steps: int, gflops: float) -> dict:
        return {"name": f"base@{steps}", "kind": "uniform", "model": "base", "steps": steps,
                "measured": {"gflops_per_image": gflops, "quality_lower_bound": {"0.95": 0.999}}}

    candidates = [cand(20, 1.0)] + ([cand(route_targets_to_steps, 0.05)] if route_targets_to_steps != 20 else [])
    return {"format": AUTO_POLICY_FORMAT, "scheduler": "ddim", "coverage": 0.95,
            "tolerances": {"attr_acc": 0.01, "clipt": 0.005}, "default": "base@20",
            "reference": {"model": "base", "steps": 20, "gflops_per_image": 1.0}, "candidates": candidates,
            "source": {"stage": "tests"}}


def with_auto_policy(bundle: Path, policy: dict) -> Path:
    """``bundle`` with ``policy`` embedded as its calibrated auto policy (bundle.json auto.policy)."""
    from budgetdiff.generation.bundle import load_bundle, write_bundle

    raw = json.loads((bundle / "bundle.json").read_text())
    raw["auto"] = {**raw["auto"], "policy": policy}
    write_bundle(bundle, raw, load_bundle(bundle).skip_policy)
    return bundle


@pytest.fixture(scope="module")
def bundles(tiny_components, tmp_path_factory) -> dict[str, Path]:
    """good: keeps its auto policy's promise (every plan is the full 20 steps); broken: its policy
    claims 1 step reaches quality 0.999 for 95 % of prompts (the coverage promise fails);
    same_behaviour: good's with an unused skip point (another content hash, the same images)."""
    root = tmp_path_factory.mktemp("bundles")

    def make(name: str, auto_policy: dict, **kw) -> Path:
        return with_auto_policy(make_tiny_bundle(root / name, tiny_components, student_max_steps=0, **kw), auto_policy)

    return {
        "good": make("good", tiny_auto_policy()),
        "broken": make("broken", tiny_auto_policy(route_targets_to_steps=1)),
        "same_behaviour": make("same", tiny_auto_policy(),
                               policy=tiny_skip_policy(thresholds=(0.05, 0.2, 0.5), default=0.5)),
        "no_policy": make_tiny_bundle(root / "no_policy", tiny_components, student_max_steps=0),
    }


@pytest.fixture(scope="module")
def registry_env(tmp_path_factory):
    """A fresh sqlite registry (created before use) on MLFLOW_TRACKING_URI for the module."""
    import mlflow

    from registry.server import create_database

    root = tmp_path_factory.mktemp("registry")
    uri = create_database(root / "mlflow.db", root / "mlartifacts")
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("BUDGETDIFF_REGISTRY_CACHE", str(root / "cache"))
        yield {"uri": uri, "root": root}
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reports") / "adaptive.json"
    path.write_text(json.dumps({"targets": {"ddim": {"nfe_speedup_at_psnr": {"met": True, "nfe_speedup": 2.82}},
                                            "deepcache N=2": True}}))
    return path


@pytest.fixture(scope="module")
def flow(registry_env, bundles, scorer, report):
    """register good -> promote (first champion: its promise and the floors) -> register broken ->
    promote (refused: coverage) -> register same_behaviour -> promote (passes) -> register
    no_policy -> promote (refused: it drops the promise); the results of each step."""
    from registry.promote import promote
    from registry.store import aliases, connect, register

    client = connect()
    out = {"client": client}
    out["reg_good"] = register(str(bundles["good"]), [str(report)], client)
    out["gate_good"] = promote(GATE, client=client, scorer=scorer, evaluator_id="tiny")
    out["reg_broken"] = register(str(bundles["broken"]), [str(report)], client)
    out["gate_broken"] = promote(GATE, client=client, scorer=scorer, evaluator_id="tiny")
    out["aliases_after_broken"] = aliases(client)
    out["reg_same"] = register(str(bundles["same_behaviour"]), [str(report)], client)
    out["gate_same"] = promote(GATE, client=client, scorer=scorer, evaluator_id="tiny")
    out["reg_no_policy"] = register(str(bundles["no_policy"]), [str(report)], client)
    out["gate_no_policy"] = promote(GATE, client=client, scorer=scorer, evaluator_id="tiny")
    return out


def test_first_version_is_promoted_on_its_promise_and_floors(flow):
    assert flow["reg_good"]["registered"] and flow["reg_good"]["version"] == "1"
    gate = flow["gate_good"]
    assert gate["verdict"] == "promoted" and gate["against"].startswith("floors")
    kinds = {r["metric"]: r["kind"] for r in gate["rows"]}
    assert kinds == {"fidelity/attr_acc": "promise", "fidelity/clipt": "promise", "coverage/q0.9": "promise",
                     "domain/attr_acc": "floor", "cost/gflops_per_image": "floor"}  # nothing to compare with yet
    assert not any(m.startswith(("pixel/", "mid/", "high/iclip")) for m in kinds)  # auto promises no pixel similarity
    metrics = gate["challenger_metrics"]
    assert metrics["promise/q0.9/reached"] == 4 and metrics["promise/coverage"] == 0.95
    assert metrics["promise/attr_acc_vs_full/mean"] == pytest.approx(0, abs=1e-6)  # the default plan is full-step
    assert metrics["quality/mean"] > 0.99 and "pixel/ssim" in metrics  # measured, not gated


def test_broken_promise_is_refused_with_its_numbers(flow):
    from registry.promote import format_gate

    gate = flow["gate_broken"]
    assert gate["verdict"] == "refused" and gate["challenger"] == "2" and gate["champion"] == "1"
    assert gate["failed"] == ["coverage/q0.9"]
    row = next(r for r in gate["rows"] if r["metric"] == "coverage/q0.9")
    reached = gate["challenger_metrics"]["promise/q0.9/reached"]
    assert reached <= 3 and row["measured"] == f"{int(reached)}/4 reach 0.9"
    assert row["challenger"] < row["threshold"] == 0.95 and not row["passed"]
    assert row["champion"] > 0.95  # the champion keeps the same promise
    assert "coverage/q0.9" in gate["message"]  # mlflow.validate_evaluation_results said so too
    table = format_gate(gate)
    assert "REFUSED" in table and f"{row['challenger']:.4f}" in table and "failing: coverage/q0.9" in table
    assert flow["aliases_after_broken"] == {"champion": "1", "challenger": "2"}
    tags = flow["client"].get_model_version("budgetdiff", "2").tags
    assert tags["gate.verdict"] == "refused" and tags["gate.failed"] == "coverage/q0.9"
    criteria = {c["metric"]: c for c in json.loads(tags["gate.criteria"])}
    assert not criteria["coverage/q0.9"]["passed"] and criteria["fidelity/attr_acc"]["passed"]
    run = flow["client"].get_run(tags["gate.run_id"])
    assert run.data.metrics["challenger/promise/q0.9/reached"] == reached
    assert run.data.metrics["champion/promise/q0.9/reached"] == 4


def test_good_challenger_is_promoted_and_champion_metrics_are_reused(flow):
    gate = flow["gate_same"]
    assert gate["verdict"] == "promoted" and gate["champion"] == "3" and not gate["failed"]
    assert gate["reused_metrics"] == {"challenger": False, "champion": True}
    assert gate["challenger_metrics"] == pytest.approx(gate["champion_metrics"], nan_ok=True)
    kinds = {r["kind"] for r in gate["rows"]}
    assert kinds == {"promise", "no-regression"}  # each bound is the stricter: here the champion's, not the floor


def test_challenger_without_a_promise_is_refused(flow):
    gate = flow["gate_no_policy"]
    assert gate["verdict"] == "refused" and gate["failed"] == ["auto_policy"]
    assert not any(k.startswith("promise/") for k in gate["challenger_metrics"])
    assert gate["champion"] == "3"


def test_lineage_tags(flow, bundles):
    from budgetdiff.io.fingerprint import unet_fingerprint

    tags = flow["client"].get_model_version("budgetdiff", "1").tags
    assert tags["bundle_sha256"] == flow["reg_good"]["bundle_sha256"]
    assert tags["unet_fingerprint"] == unet_fingerprint(bundles["good"].parent / "base")
    assert tags["student_unet_fingerprint"] == unet_fingerprint(bundles["good"].parent / "student")
    assert len(tags["git_commit"]) >= 7
    assert len([k for k in tags if k.startswith("dvc.")]) == 4  # base, student, budget, bundle
    assert tags["bench.adaptive.ddim.nfe_speedup_at_psnr.nfe_speedup"] == "2.82"
    assert tags["bench.adaptive.deepcache N_2"] == "true"
    assert tags["shared.base/text_encoder.sha256"] == tags["shared.student/text_encoder.sha256"]


def test_dvc_lock_hashes_of_the_real_models():
    from registry.store import dvc_lock_hashes

    hashes = dvc_lock_hashes(["models/base", "models/bundle", "models/nonexistent"])
    assert hashes["dvc.models/base"].endswith(".dir") and hashes["dvc.models/nonexistent"] == "unknown"


def test_reregistering_the_same_bundle_registers_nothing(flow, bundles, report):
    from registry.store import register, versions

    again = register(str(bundles["good"]), [str(report)], flow["client"])
    assert not again["registered"] and again["version"] == "1"
    assert len(versions(flow["client"])) == 4


def test_version_holds_the_bundle_without_the_text_encoder(flow):
    import mlflow

    from registry.artifacts import MANIFEST

    local = Path(mlflow.artifacts.download_artifacts(f"models:/budgetdiff/1"))
    bundle = local / "artifacts" / "bundle"
    raw = json.loads((bundle / "bundle.json").read_text())
    assert raw["base"]["path"] == "base" and raw["student"]["path"] == "student" and raw["budget"]["path"] == "budget"
    assert not (bundle / "base" / "text_encoder").exists()  # referenced by content hash
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert set(manifest["shared"]) == {"base/text_encoder", "student/text_encoder"}
    assert all(ref["uri"].startswith("runs:/") for ref in manifest["shared"].values())
    suffixes = {Path(f).suffix for f in manifest["files"]}
    assert suffixes <= {".safetensors", ".json", ".txt"}


def test_rollback_restores_the_previous_champion(flow, capsys):
    from registry.cli import main
    from registry.store import aliases, champion_history

    client = flow["client"]
    assert [h["version"] for h in champion_history(client)] == ["1", "3"]
    assert main(["rollback"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"champion": "1", "previous": "3"}
    assert aliases(client)["champion"] == "1"
    assert main(["rollback"]) == 2  # version 1 was the first champion
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "champion" in listing and "refused" in listing and "promoted" in listing
    # the verdict per criterion, under each judged version
    assert re.search(r"coverage/q0\.9\s+promise\s+\S+\s+>= 0\.95\s+FAIL", listing)
    assert re.search(r"fidelity/attr_acc\s+promise\s+\S+\s+>= -0\.01\s+pass", listing)
    # put version 3 back for the tests that follow (the gate reuses both versions' numbers)
    from registry.store import set_champion

    set_champion(client, "3", by="test")


def test_cli_bad_input_is_one_line(flow, capsys, tmp_path, monkeypatch):
    from registry.cli import main

    assert main(["promote", "--version", "99", "--params", str(REPO / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "99" in err
    assert main(["register", "--bundle", str(tmp_path / "nope"), "--params", str(REPO / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    with pytest.raises(SystemExit) as exc:
        main(["promote", "--bogus"])
    assert exc.value.code == 2 and capsys.readouterr().err.strip().startswith("error: ")
    assert main(["promote", "--params", str(tmp_path / "missing.yaml")]) == 2


def test_cli_refused_promotion_prints_failing_metrics(flow, capsys, monkeypatch, scorer, tmp_path):
    import yaml

    import registry.promote as promote_module
    from registry.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"registry": {"bundle": "x", "reports": [], "gate": GATE}}))
    monkeypatch.setattr(promote_module, "scorer_from_params", lambda cfg: (scorer, "tiny"))
    assert main(["promote", "--version", "2", "--params", str(params)]) == 1  # reuses version 2's numbers
    out = capsys.readouterr().out
    assert "REFUSED" in out and "coverage/q0.9" in out.split("failing:")[1]
    assert json.loads(out.strip().splitlines()[-1])["verdict"] == "refused"


def test_champion_generates_in_a_fresh_process(flow, registry_env, tmp_path):
    png = tmp_path / "out.png"
    cache = tmp_path / "empty-cache"  # the text encoder comes from the artifact store
    proc = subprocess.run([sys.executable, "-m", "registry", "generate", PROMPT, "--alias", "champion", "--seed", "3",
                           "--out", str(png)], cwd=tmp_path, env=_env(registry_env["uri"], cache),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["model_uri"] == "models:/budgetdiff@champion" and record["nfe"] > 0
    from PIL import Image

    assert Image.open(png).size == (16, 16)
    assert any((cache / "sha256").iterdir())


def test_fresh_store_register_then_promote_makes_a_champion_that_generates(bundles, scorer, tmp_path, monkeypatch,
                                                                            capsys):
    """A new user's path: in a fresh tracking store, `budgetdiff-registry register` then `promote`
    make the bundle champion (judged on its promise and the floors alone), `list` shows the verdict
    per criterion, and models:/budgetdiff@champion loads and generates in a new process."""
    import mlflow
    import yaml

    import registry.promote as promote_module
    from registry.cli import main
    from registry.server import create_database

    uri = create_database(tmp_path / "mlflow.db", tmp_path / "mlartifacts")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"registry": {"bundle": str(bundles["good"]), "reports": [], "gate": GATE}}))
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("BUDGETDIFF_REGISTRY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(promote_module, "scorer_from_params", lambda cfg: (scorer, "tiny"))
    try:
        assert main(["register", "--params", str(params)]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["version"] == "1"
        assert main(["promote", "--params", str(params)]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["verdict"] == "promoted" and result["champion"] == "1" and result["failed"] == []
        assert main(["list"]) == 0
        listing = capsys.readouterr().out
        assert re.search(r"^\s+1 challenger,champion .* promoted vs floors", listing, re.M)
        for criterion in ("fidelity/attr_acc", "fidelity/clipt", "coverage/q0.9", "domain/attr_acc"):
            assert re.search(rf"{re.escape(criterion)}\s+\S+\s+\S+\s+[<>]= \S+\s+pass", listing), criterion
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    png = tmp_path / "champion.png"
    proc = subprocess.run([sys.executable, "-m", "registry", "generate", PROMPT, "--alias", "champion", "--seed", "5",
                           "--out", str(png)], cwd=tmp_path, env=_env(uri, tmp_path / "fresh-cache"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["model_uri"] == "models:/budgetdiff@champion" and record["mode"] == "auto" and record["nfe"] == 20
    from PIL import Image

    assert Image.open(png).size == (16, 16)


def _stage_twice(cfg: dict, store: Path, scorer, evaluator_id: str, monkeypatch, between=None) -> list[dict]:
    """Run the register stage's function twice on the tracking store ``store`` (a sqlite file that
    need not exist: a fresh clone has no mlflow.db), writing the report as the stage does; after each
    run: the report's bytes, the versions, the aliases and the number of runs in the experiment."""
    import mlflow

    from budgetdiff.io import atomic_write_json
    from mlops.params import config_from_dict
    from registry import EXPERIMENT
    from registry.cli import RegistryConfig
    from registry.stage import run
    from registry.store import aliases, connect, versions

    cfg = config_from_dict(RegistryConfig, cfg)

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.setenv("BUDGETDIFF_REGISTRY_CACHE", str(store.parent / "cache"))
    states = []
    try:
        for i in range(2):
            report = run(cfg, scorer=scorer, evaluator_id=evaluator_id)
            path = store.parent / f"registry-{i}.json"
            atomic_write_json(path, report)
            client = connect()
            exp = client.get_experiment_by_name(EXPERIMENT)
            states.append({"report": report, "bytes": path.read_bytes(), "aliases": aliases(client),
                           "versions": [(v.version, v.tags.get("bundle_sha256")) for v in versions(client)],
                           "runs": len(client.search_runs([exp.experiment_id], max_results=1000))})
            if between is not None and i == 0:
                between(client)
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    return states


def test_register_stage_on_a_fresh_store_makes_a_champion_and_a_rerun_changes_nothing(bundles, scorer, tmp_path,
                                                                                      monkeypatch):
    """A fresh clone's `dvc repro`: mlflow.db is git-ignored, so the store is empty (not even created);
    the register stage (always_changed in dvc.yaml) registers the bundle, judges it and makes it
    champion. Run again, it registers nothing, logs no gate run, moves no alias and writes the same
    reports/registry.json byte for byte (so no stage below it re-runs)."""
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "mlflow.db"
    assert not store.exists()
    cfg = {"bundle": str(bundles["good"]), "reports": [], "gate": GATE}
    first, second = _stage_twice(cfg, store, scorer, "tiny", monkeypatch)
    report = first["report"]
    assert report["version"] == "1" and report["registered"] is True
    assert report["gate"]["verdict"] == "promoted" and report["gate"]["against"].startswith("floors")
    assert first["aliases"] == {"challenger": "1", "champion": "1"} and report["champion_history"] == ["1"]
    assert "seconds" not in report and "run_id" not in report["gate"]  # nothing that differs per run
    assert second["bytes"] == first["bytes"]
    assert (second["versions"], second["aliases"], second["runs"]) == (first["versions"], first["aliases"],
                                                                       first["runs"])


def test_register_stage_rerun_keeps_a_refusal_and_a_rollback(bundles, scorer, tmp_path, monkeypatch):
    """Re-running the stage on a bundle the gate refused re-judges it (its numbers reused) without
    logging the same verdict again; and a rollback made between two runs holds: the gate moves
    champion only on a new judgement, not on the same one found again."""
    from registry.promote import promote
    from registry.store import connect, register, rollback

    monkeypatch.chdir(tmp_path)
    store = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    register(str(bundles["good"]), [], connect())
    promote(GATE, client=connect(), scorer=scorer, evaluator_id="tiny")  # version 1: champion
    refused = _stage_twice({"bundle": str(bundles["broken"]), "reports": [], "gate": GATE}, store, scorer, "tiny",
                           monkeypatch)
    assert refused[0]["report"]["gate"]["verdict"] == "refused" and refused[0]["report"]["version"] == "2"
    assert refused[1]["bytes"] == refused[0]["bytes"] and refused[1]["runs"] == refused[0]["runs"]
    assert refused[1]["aliases"] == {"champion": "1", "challenger": "2"}
    rolled = _stage_twice({"bundle": str(bundles["same_behaviour"]), "reports": [], "gate": GATE}, store, scorer,
                          "tiny", monkeypatch, between=rollback)
    assert rolled[0]["report"]["gate"]["verdict"] == "promoted" and rolled[0]["aliases"]["champion"] == "3"
    assert rolled[1]["aliases"]["champion"] == "1"  # rolled back between the runs, and the re-run kept it
    assert rolled[1]["runs"] == rolled[0]["runs"] and rolled[1]["versions"] == rolled[0]["versions"]


def test_params_gate_judges_auto_on_its_promise_not_on_pixels():
    """The shipped gate: auto is judged on what its policy promises; no rule names pixel similarity
    to the 50-step image (the absolute pixel/ssim floor once refused even a first model)."""
    import yaml

    gate = yaml.safe_load((REPO / "params.yaml").read_text())["registry"]["gate"]
    assert gate["mode"] == "auto" and gate["promise"]["quality_targets"]
    named = {m for rule in gate["rules"]["auto"].values() for m in rule}
    assert named and not any(m.startswith(("pixel/", "mid/lpips", "high/iclip")) for m in named)


def test_promise_criteria_refuse_only_what_the_data_refute():
    from registry.gate import judge

    def metrics(attr_mean: float, reached: int) -> dict:
        return {"promise/coverage": 0.95, "domain/attr_acc": 0.8,
                "promise/attr_acc_vs_full/mean": attr_mean, "promise/attr_acc_vs_full/se": 0.005,
                "promise/attr_acc_vs_full/n": 32.0, "promise/attr_acc_vs_full/tolerance": 0.01,
                "promise/q0.9/reached": float(reached), "promise/q0.9/n": 32.0}

    cfg = {"mode": "auto", "promise": {"fidelity_z": 1.96, "coverage_z": 1.96},
           "rules": {"auto": {"floors": {"domain/attr_acc": 0.7}}}}
    ok = judge(cfg, metrics(-0.015, 28), None)  # -0.015 + 1.96 * 0.005 > -0.01; 28/32: upper bound ~0.95
    assert ok["passed"], ok["rows"]
    bad = judge(cfg, metrics(-0.03, 25), None)
    assert not bad["passed"] and bad["failed"] == ["fidelity/attr_acc", "coverage/q0.9"]
    with pytest.raises(KeyError, match="unknown key"):
        judge({**cfg, "rules": {"auto": {"floor": {}}}}, metrics(0, 32), None)


def test_missing_text_encoder_fails_with_one_line(flow, registry_env, tmp_path):
    from registry.artifacts import resolve_shared_parts

    import mlflow

    local = Path(mlflow.artifacts.download_artifacts("models:/budgetdiff/1", dst_path=str(tmp_path / "v1")))
    manifest_file = local / "artifacts" / "bundle" / "registry_manifest.json"
    manifest = json.loads(manifest_file.read_text())
    for ref in manifest["shared"].values():
        ref["uri"] = "runs:/0123456789abcdef0123456789abcdef/text_encoder"  # a run that does not exist
    manifest_file.write_text(json.dumps(manifest))
    from registry import RegistryError

    with pytest.raises(RegistryError) as exc:
        resolve_shared_parts(local / "artifacts" / "bundle", cache_dir=tmp_path / "empty")
    message = str(exc.value)
    assert "\n" not in message and "text_encoder" in message and "is missing" in message


def _register_in_subprocess(bundle: Path, uri: str, cache: Path, cwd: Path):
    return subprocess.Popen([sys.executable, "-m", "registry", "register", "--bundle", str(bundle),
                             "--params", str(REPO / "params.yaml")], cwd=cwd, env=_env(uri, cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_concurrent_registrations_do_not_corrupt_the_registry(bundles, tmp_path):
    from mlflow import MlflowClient

    from registry.server import create_database

    uri = create_database(tmp_path / "mlflow.db", tmp_path / "mlartifacts")  # before the racing processes
    procs = [_register_in_subprocess(bundles[name], uri, tmp_path / "cache", tmp_path) for name in ("good", "broken")]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sorted(r["version"] for r in results) == ["1", "2"]
    client = MlflowClient(uri, uri)
    found = {str(v.version): v for v in client.search_model_versions("name='budgetdiff'")}
    assert set(found) == {"1", "2"}
    assert {found[r["version"]].tags["bundle_sha256"] for r in results} == {r["bundle_sha256"] for r in results}
    assert str(client.get_registered_model("budgetdiff").aliases["challenger"]) in {"1", "2"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_mlflow_server_http_uri(bundles, scorer, tmp_path, monkeypatch):
    """The same register / promote / list through `mlflow server`'s http URI."""
    import mlflow

    from registry.cli import main
    from registry.promote import promote
    from registry.server import healthy, start, stop
    from registry.store import aliases, connect, register

    pid_file = tmp_path / "server.pid"
    url = start(port=_free_port(), db=tmp_path / "mlflow.db", artifacts=tmp_path / "mlartifacts", pid_file=pid_file,
                timeout=300)
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        assert healthy(url)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("BUDGETDIFF_REGISTRY_CACHE", str(tmp_path / "cache"))
        client = connect()
        reg = register(str(bundles["good"]), [], client)
        assert reg["registered"] and reg["version"] == "1"
        gate = promote(GATE, client=client, scorer=scorer, evaluator_id="tiny")
        assert gate["verdict"] == "promoted" and aliases(client)["champion"] == "1"
        assert main(["list", "--json"]) == 0
    finally:
        assert stop(pid_file)
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    assert not healthy(url) and not pid_file.exists()


# ------------------------------------------------------------------------------------------
# Serving from the registry (serving.sources, registry.resolve, budgetdiff-registry fetch)
# ------------------------------------------------------------------------------------------
def test_service_loads_the_champion_and_follows_the_alias(flow, registry_env):
    import asyncio

    from budgetdiff.generation.engine import GenerationRequest
    from registry.store import aliases, set_champion
    from serving.model import LocalImageModel

    client = flow["client"]
    champion = aliases(client)["champion"]
    model = LocalImageModel()

    async def run():
        await model.reconfigure({"model_source": "models:/budgetdiff@champion", "warmup": False})
        first = await model.generate([GenerationRequest(PROMPT, mode="full", steps=2, seed=1)])
        assert not await model.poll_registry_once()  # alias unchanged: nothing reloads
        other = "1" if champion != "1" else "3"
        set_champion(client, other, by="test")
        try:
            assert await model.poll_registry_once()
            second = await model.generate([GenerationRequest(PROMPT, mode="full", steps=2, seed=1)])
        finally:
            set_champion(client, champion, by="test")
        return first, second, other

    first, second, other = asyncio.run(run())
    assert first["model_version"]["registry_version"] == champion
    assert first["model_version"]["registry"]["alias"] == "champion"
    assert second["model_version"]["registry_version"] == other
    assert second["model_version"]["id"] != first["model_version"]["id"] and model.swaps == 1


def test_fetch_writes_a_bundle_that_loads(flow, registry_env, tmp_path, capsys):
    from budgetdiff.generation.engine import Generator
    from registry.cli import main

    assert main(["fetch", "models:/budgetdiff@champion", "--out", str(tmp_path / "dl")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    champion = flow["client"].get_model_version_by_alias("budgetdiff", "champion")
    assert out["version"] == str(champion.version) and out["fetched"] is True
    assert out["bundle_sha256"] == champion.tags["bundle_sha256"]
    assert out["bundle_dir"] == str(tmp_path / "dl") and Path(out["bundle_dir"]).is_dir()
    # self-contained: the referenced text encoder is a real copy, nothing links into the cache
    assert not any(p.is_symlink() for p in Path(out["bundle_dir"]).rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl"]
    gen = Generator.load(out["bundle_dir"])
    assert gen.models["base"].pipe is not None
    assert main(["fetch", "models:/budgetdiff@nosuchalias", "--out", str(tmp_path / "dl2")]) == 2
    assert "no such alias" in capsys.readouterr().err
