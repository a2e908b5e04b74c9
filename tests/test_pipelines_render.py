"""The ``render`` stage: shards written atomically with checksums, resumed after a crash or a
kill with no duplicate or missing image, corrupt shards reported and redone; Ray tasks."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import yaml

from budgetdiff.io.fingerprint import content_sha256
from budgetdiff.io.shards import ShardChecksumError, ShardError, ShardStore
from conftest import REPO, cli_error
from mlops.params import config_dict, config_from_dict, load_config
from pipelines import prompts as prompt_stage
from pipelines import render

STEP_GRID, REFERENCE = [1, 2], 3


def write_prompts(path, n: int) -> None:
    """``n`` scene prompts (split 0.5 / 0.25 / 0.25) written to ``path``."""
    prompts, _ = prompt_stage.build_prompts(config_from_dict(prompt_stage.PromptsConfig, {
        "source": "scenes", "n_prompts": n, "count_weights": [0.25] * 4, "seed_offset": 60_000_000,
        "split": {"train": 0.5, "val": 0.25, "test": 0.25}, "split_seed": 0, "max_prompt_chars": 500,
        "output": str(path), "report_path": "unused.json"}))
    prompt_stage.write_parquet(prompts, path)


@pytest.fixture()
def cfg(tmp_path, tiny_model_dir) -> render.RenderConfig:
    write_prompts(tmp_path / "prompts.parquet", 6)
    return config_from_dict(render.RenderConfig, {
        "model": str(tiny_model_dir), "prompts": str(tmp_path / "prompts.parquet"), "step_grid": STEP_GRID,
        "reference_steps": REFERENCE, "scheduler": "ddim", "guidance": None, "batch_size": 4,
        "executor": "local", "workers": 1, "cpus_per_task": 1, "output_dir": str(tmp_path / "renders"),
        "report_path": str(tmp_path / "render.json"), "run_log": str(tmp_path / "render_run.json")})


def counting(executor, log: list, fail_after: int | None = None):
    """``executor`` that records each shard it renders and raises after ``fail_after`` results."""

    def run(shards, settings):
        for i, (shard, result) in enumerate(executor(shards, settings)):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("simulated crash")
            log.append(shard.name)
            yield shard, result

    return run


def all_rows(cfg) -> list[tuple[int, int]]:
    """(prompt_id, steps) of every image in the finished render, checksums verified."""
    index = json.loads((render.Path(cfg.output_dir) / render.INDEX_FILE).read_text())
    store, rows = ShardStore(cfg.output_dir), []
    for shard in index["shards"]:
        arrays, manifest = store.read(shard["name"], key=shard["key"])
        assert arrays["images"].dtype == np.uint8 and (arrays["nfe"] == manifest["meta"]["steps"]).all()
        assert set(arrays) == {"prompt_id", "images", "nfe"}  # no wall-clock: the data is deterministic
        rows += [(int(i), shard["steps"]) for i in arrays["prompt_id"]]
    return rows


def expected_rows():
    return sorted((i, s) for i in range(6) for s in [*STEP_GRID, REFERENCE])


def test_resume_after_a_crash_redoes_only_unfinished_shards(cfg):
    first: list[str] = []
    with pytest.raises(RuntimeError, match="simulated crash"):
        render.run(cfg, executor=counting(render.local_executor(), first, fail_after=2), progress=False)
    assert len(first) == 2 and not (render.Path(cfg.output_dir) / render.INDEX_FILE).exists()
    second: list[str] = []
    _, log = render.run(cfg, executor=counting(render.local_executor(), second), progress=False)
    assert (log["shards"], log["shards_reused"], log["shards_rendered"]) == (6, 2, 4)
    assert set(first).isdisjoint(second) and len(set(first + second)) == 6
    rows = all_rows(cfg)
    assert sorted(rows) == expected_rows() and len(set(rows)) == len(rows)
    rerun: list[str] = []
    _, log = render.run(cfg, executor=counting(render.local_executor(), rerun), progress=False)
    assert rerun == [] and log["shards_reused"] == 6
    assert json.loads(render.Path(cfg.run_log).read_text()) == log


def test_an_image_does_not_depend_on_its_batch(cfg):
    """What makes resuming exact: a prompt's image depends on its prompt, seed and steps only."""
    settings = render.settings_for(cfg.model, cfg.scheduler, cfg.guidance)
    frame = render.read_prompts(cfg.prompts)
    prompts, seeds = frame["prompt"].tolist(), frame["seed"].tolist()
    whole = render.render_batch(settings, 2, prompts[:4], seeds[:4])["images"]
    pair = render.render_batch(settings, 2, [prompts[3], prompts[1]], [seeds[3], seeds[1]])["images"]
    assert np.abs(pair.astype(int) - whole[[3, 1]].astype(int)).max() <= 1  # at most float rounding


def test_changed_params_rerender_and_prune(cfg):
    render.run(cfg, executor=render.local_executor(), progress=False)
    log: list[str] = []
    changed = replace(cfg, step_grid=[2], guidance=1.0)
    render.run(changed, executor=counting(render.local_executor(), log), progress=False)
    # Another guidance: every kept shard is stale and rendered again; the 1-step shards are pruned.
    assert sorted(log) == ["s0002-p00000", "s0002-p00001", "s0003-p00000", "s0003-p00001"]
    names = sorted(p.name for p in render.Path(cfg.output_dir).iterdir())
    assert names == sorted([f"{n}{x}" for n in log for x in (".npz", ".json")] + ["index.json"])


def test_checksum_mismatch_is_reported_and_the_shard_redone(cfg, capsys):
    render.run(cfg, executor=render.local_executor(), progress=False)
    store = ShardStore(cfg.output_dir)
    path = store.data_path("s0001-p00001")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardChecksumError, match=r"shard .*s0001-p00001\.npz: checksum mismatch \(manifest sha256 "):
        store.read("s0001-p00001")
    log: list[str] = []
    render.run(cfg, executor=counting(render.local_executor(), log), progress=False)
    assert log == ["s0001-p00001"] and "shard s0001-p00001 is corrupt; rendering it again" in capsys.readouterr().out
    assert sorted(all_rows(cfg)) == expected_rows()
    store.manifest_path("s0001-p00001").unlink()
    with pytest.raises(ShardError, match="not finished"):
        store.read("s0001-p00001")


SLOW_RENDER = """
import sys, time
from mlops.params import load_config
from pipelines import render
cfg = load_config("render", render.RenderConfig, sys.argv[1])
def slow(shards, settings):
    for shard, result in render.local_executor()(shards, settings):
        time.sleep(0.3)
        yield shard, result
render.run(cfg, executor=slow, progress=False)
print("finished")
"""


@pytest.mark.slow  # two fresh Python processes importing torch and diffusers: about a minute here
def test_resume_after_the_process_is_killed(cfg, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"render": config_dict(cfg)}))
    (tmp_path / "slow_render.py").write_text(SLOW_RENDER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(tmp_path / "slow_render.py"), str(tmp_path / "params.yaml")]
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    store = ShardStore(cfg.output_dir)
    deadline = time.time() + 120
    while len(store.names()) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = store.names()
    assert 2 <= len(done) < 6, proc.stdout.read().decode()[-2000:]
    finished = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0 and "finished" in finished.stdout, finished.stdout + finished.stderr
    run = json.loads((tmp_path / "render_run.json").read_text())
    assert run["shards_reused"] >= len(done) and run["shards_rendered"] == 6 - run["shards_reused"]
    rows = all_rows(cfg)
    assert sorted(rows) == expected_rows() and len(set(rows)) == len(rows)
    assert not [p for p in render.Path(cfg.output_dir).iterdir() if p.suffix == ".tmp"]


@pytest.mark.slow  # starting Ray and its workers: about 50 s on 2 cores (tests/test_workflow.py runs Ray too)
def test_ray_tasks(cfg):
    import ray

    _, log = render.run(replace(cfg, executor="ray", workers=1, local_object_store_mb=80), progress=False)
    assert not ray.is_initialized()  # shut down after the stage
    assert log["shards_rendered"] == 6
    assert sorted(all_rows(cfg)) == expected_rows()


def test_seeds_per_prompt_adds_replicates_and_keeps_single_seed_shards(cfg):
    render.run(cfg, executor=render.local_executor(), progress=False)
    log: list[str] = []
    report, run_log = render.run(replace(cfg, seeds_per_prompt=2, seed_stride=1000),
                                 executor=counting(render.local_executor(), log), progress=False)
    # Replicate 0 is the single-seed run: all of its shards are reused, only replicate 1 renders.
    assert run_log["shards_reused"] == 6 and sorted(log) == sorted(
        f"s{s:04d}-r1-p{k:05d}" for s in [*STEP_GRID, REFERENCE] for k in range(2))
    assert report["seeds_per_prompt"] == 2
    index = json.loads((render.Path(cfg.output_dir) / render.INDEX_FILE).read_text())
    base = dict(zip(render.read_prompts(cfg.prompts)["prompt_id"], render.read_prompts(cfg.prompts)["seed"]))
    store, images = ShardStore(cfg.output_dir), {}
    for shard in index["shards"]:
        arrays, _ = store.read(shard["name"], key=shard["key"])
        ids = arrays["prompt_id"].tolist()
        assert shard["seeds"] == [base[i] + 1000 * shard["replicate"] for i in ids]
        images.update({(i, shard["replicate"], shard["steps"]): im for i, im in zip(ids, arrays["images"])})
    assert len(images) == 6 * 2 * 3
    # Another seed is another image (same prompt, same steps).
    assert all((images[i, 0, 2] != images[i, 1, 2]).any() for i in range(6))


def test_bad_input_is_one_line_error(cfg, tmp_path, monkeypatch, capsys):
    import mlops.params

    section = f"params file {tmp_path / 'params.yaml'}: section 'render'"
    cases = {"step_grid": ([2, 2], "render.step_grid: repeated step counts"),
             "reference_steps": (2, "render.reference_steps: must be an integer above the grid's largest count 2"),
             "scheduler": ("plms", "render.scheduler: unknown scheduler 'plms'"),
             "seeds_per_prompt": (0, "render.seeds_per_prompt: must be a positive integer, got 0"),
             "model": (str(tmp_path / "nowhere"), "model: directory"),
             "prompts": (str(tmp_path / "none.parquet"), "(run the prompts stage)"),
             "executor": ("dask", f"{section}: executor: expected one of 'ray', 'local', got 'dask'"),
             "batch_size": ("64", f"{section}: batch_size: expected an integer, got '64'"),
             "seed_strid": (10, f"{section}: unknown key seed_strid")}
    for key, (value, message) in cases.items():
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"render": {**config_dict(cfg), key: value}}))
        monkeypatch.setattr(mlops.params, "PARAMS_FILE", tmp_path / "params.yaml")
        assert message in cli_error(capsys, render.main)


def file_bytes(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(render.Path(directory).iterdir())}


def test_rendering_twice_gives_the_same_bytes(cfg, tmp_path):
    """A fresh clone's re-render must hash to what dvc.lock records: the shards, their manifests,
    the index and the report are the same bytes however the work was split (here: a second run
    in another directory, and a third resumed after a crash)."""
    render.run(cfg, executor=render.local_executor(threads=1), progress=False)
    first = {**file_bytes(cfg.output_dir), "report": render.Path(cfg.report_path).read_bytes()}
    again = replace(cfg, output_dir=str(tmp_path / "again"), report_path=str(tmp_path / "again.json"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        render.run(again, executor=counting(render.local_executor(threads=1), [], fail_after=3), progress=False)
    render.run(again, executor=render.local_executor(threads=1), progress=False)
    second = {**file_bytes(again.output_dir), "report": render.Path(again.report_path).read_bytes()}
    assert first.keys() == second.keys() and len(first) == 2 * 6 + 2  # 6 shards + manifests, index, report
    assert [name for name in first if first[name] != second[name]] == []
    log = json.loads(render.Path(cfg.run_log).read_text())
    assert log["seconds"] > 0 and "seconds" not in json.loads(first["report"])


def test_open_executor_names_a_bad_executor_and_gives_a_local_one():
    with pytest.raises(ValueError, match=r"bench_render.executor: must be 'ray' or 'local', got 'dask'"):
        with render.open_executor("dask", 1, label="bench_render"):
            pass
    with render.open_executor("local", 1, cpus_per_task=1) as make:
        assert callable(make(4))  # the local executor renders one shard at a time, whatever is asked


def test_shard_keys_are_those_of_the_dict_config():
    """A shard's key hashes the plan (settings, steps, prompts, seeds); the typed render config
    must give the keys the raw params section gave, so that the rendered data (dvc.lock) stays
    valid. Pinned: the keys for params.yaml's grid, seeds and batch size and three fixed prompts
    (taken with the dict config); and params.yaml's own section read both ways."""
    prompts = pd.DataFrame({"prompt_id": [0, 1, 2], "prompt": ["a red circle", "a blue square", "two green stars"],
                            "seed": [60_000_000, 61_000_000, 62_000_000]})
    settings = render.RenderSettings("models/base", "0123456789abcdef" * 2, "ddim", 1.25)
    section = {"model": "models/base", "prompts": "unused", "step_grid": [2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 30, 50],
               "reference_steps": 100, "seeds_per_prompt": 3, "seed_stride": 100000, "scheduler": "ddim",
               "batch_size": 64, "workers": 2, "output_dir": "unused"}
    plan = render.shard_plan(config_from_dict(render.RenderConfig, section), prompts, settings)
    assert len(plan) == 39 and plan[0].key == "060d653d9937e1f3a8323c8241f78e45"
    assert content_sha256([s.key for s in plan]) == "fa40a4405ce99a0c"

    cfg = load_config("render", render.RenderConfig, REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())["render"]
    old = render.plan_shards(prompts, list(raw["step_grid"]), raw["reference_steps"], raw["batch_size"], settings,
                             raw.get("seeds_per_prompt", 1), raw.get("seed_stride", render.DEFAULT_SEED_STRIDE))
    assert [s.key for s in render.shard_plan(cfg, prompts, settings)] == [s.key for s in old]


def test_bench_render_measures_the_render_sections_settings(cfg, tmp_path):
    """bench_render reads the render stage's typed section and times it (local executor here)."""
    from benchmarks.bench_render import BenchRenderConfig, run as bench

    report = bench(BenchRenderConfig(prompts_measured=3, steps=2, workers=[1], report_path=str(tmp_path / "b.json")),
                   cfg, executor="local")
    assert report["scheduler"] == "ddim" and report["batch_size"] == cfg.batch_size and report["prompts"] == 3
    assert report["images_per_s"]["1"] > 0 and json.loads((tmp_path / "b.json").read_text()) == report
