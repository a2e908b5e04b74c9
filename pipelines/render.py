"""DVC stage ``render``: every prompt at every step count of the grid, plus the reference, on Ray.

Work is cut into shards of ``batch_size`` prompts at one step count (batching images of the
same step count is where the speed is: one network call per step for the whole batch). Each
shard is a Ray task; the driver writes its result with ``budgetdiff.io.shards.ShardStore``
(data and manifest each written atomically, SHA-256 recorded and verified). A rerun after an
interruption finds the finished shards by their manifests, verifies them, and renders only the
rest; a shard whose key (model fingerprint, scheduler, guidance, step count, its prompts and
seeds) differs from the current plan is rendered again, so changed parameters never mix. The
output directory is a ``persist: true`` DVC output so that ``dvc repro`` keeps it for resuming.

Ray: a local ``ray.init()`` with ``workers x cpus_per_task`` CPUs by default, the existing
cluster when ``RAY_ADDRESS`` is set (then the code must be importable and ``model`` readable on
the workers, e.g. a shared filesystem or the cluster's image). Each task asks for
``cpus_per_task`` CPUs (its torch threads) and, when the cluster has GPUs, ``gpus_per_task``
GPUs. ``executor: local`` renders in this process instead (no Ray; for debugging).

**Seeds per prompt.** ``seeds_per_prompt`` R (default 1) renders every prompt with R seeds: the
prompt's own seed (data/prompts.parquet) and seed + j·``seed_stride`` for j = 1 .. R − 1, each a
replicate with its own shards (``s<steps>-p<k>`` for replicate 0, the names of a single-seed run, so
raising R keeps what was rendered; ``s<steps>-r<j>-p<k>`` for the others). A prompt's curve depends
on its seed as well as on its words; averaged over R seeds it is the expected curve that a
predictor reading only the prompt can learn (``training/budget.py``). The index lists each shard's
replicate and seeds, which the score stage reads.

Each image records its NFE (network evaluations; a CFG pair batched in one call counts once).
The same prompt and seed get the same initial noise at every step count, so an image and its
reference differ only in the number of steps.

**Deterministic outputs.** The shards, ``index.json`` and ``report_path`` depend only on the
model, the prompts and the params (each task renders with ``cpus_per_task`` torch threads, a
fixed batch per shard): a fresh clone's re-render hashes to what ``dvc.lock`` records, so no
stage below re-runs. What differs from run to run (wall-clock, shards rendered or reused) goes
to ``run_log`` (git-ignored ``logs/``), and render speed is measured by its own stage,
``benchmarks/bench_render.py``.

Outputs: ``output_dir`` (shards + ``index.json``: the plan, model, scheduler, guidance) and
``report_path`` (reports/render.json: the settings and the plan's size).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

import numpy as np
import pandas as pd
from tqdm import tqdm

from budgetdiff.io.fingerprint import directory_fingerprint
from budgetdiff.io import atomic_write_json
from budgetdiff.io.shards import ShardStore, work_key
from mlops.cli import command
from pipelines.schema import INDEX_FILE, read_prompts

# Under `uv run` (make repro, make test) Ray would otherwise package the working directory, models
# included, for its workers (over 500 MB here): local workers already share this environment.
# Read by Ray when it is imported, so it is set before the first `import ray`.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

DEFAULT_SEED_STRIDE = 100_000


@dataclass(frozen=True, kw_only=True)
class RenderConfig:
    """params.yaml ``render`` (the defaults are the stage's when a key is left out)."""

    model: str
    prompts: str
    step_grid: list[int]
    reference_steps: int
    seeds_per_prompt: int = 1
    seed_stride: int = DEFAULT_SEED_STRIDE
    scheduler: str  # a name of budgetdiff.generation.pipeline.SCHEDULERS (any case)
    guidance: Optional[float] = None
    batch_size: int
    executor: Literal["ray", "local"] = "ray"
    workers: int
    cpus_per_task: int = 1
    gpus_per_task: float = 1.0
    local_object_store_mb: Optional[int] = None
    output_dir: str
    report_path: Optional[str] = None  # None: no report written
    run_log: Optional[str] = None  # None: no run log written


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: ``prompt_ids`` (with their prompts and seeds) at ``steps`` steps."""

    name: str
    steps: int
    is_reference: bool
    prompt_ids: tuple[int, ...]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    key: str
    replicate: int = 0


@dataclass(frozen=True)
class RenderSettings:
    """What every image of one run shares (and what a shard's key hashes)."""

    model: str
    model_fingerprint: str
    scheduler: str
    guidance: float


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------
def check_steps(step_grid: list[int], reference_steps: int) -> None:
    if not step_grid or any(not isinstance(s, int) or s < 1 for s in step_grid):
        raise ValueError(f"render.step_grid: must be a non-empty list of positive integers, got {step_grid}")
    if len(set(step_grid)) != len(step_grid):
        raise ValueError(f"render.step_grid: repeated step counts in {step_grid}")
    if not isinstance(reference_steps, int) or reference_steps <= max(step_grid):
        raise ValueError(f"render.reference_steps: must be an integer above the grid's largest count "
                         f"{max(step_grid)}, got {reference_steps}")


def check_seeds(seeds_per_prompt, seed_stride) -> None:
    if not isinstance(seeds_per_prompt, int) or isinstance(seeds_per_prompt, bool) or seeds_per_prompt < 1:
        raise ValueError(f"render.seeds_per_prompt: must be a positive integer, got {seeds_per_prompt!r}")
    if not isinstance(seed_stride, int) or isinstance(seed_stride, bool) or seed_stride < 1:
        raise ValueError(f"render.seed_stride: must be a positive integer, got {seed_stride!r}")


def plan_shards(prompts: pd.DataFrame, step_grid: list[int], reference_steps: int, batch_size: int,
                settings: RenderSettings, seeds_per_prompt: int = 1,
                seed_stride: int = DEFAULT_SEED_STRIDE) -> list[ShardSpec]:
    """Every (step count, replicate, batch of prompts) shard, the longest step counts first (they
    take longest, so starting them first balances the workers). Replicate j renders each prompt
    with its seed + j·``seed_stride``."""
    check_steps(step_grid, reference_steps)
    check_seeds(seeds_per_prompt, seed_stride)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"render.batch_size: must be a positive integer, got {batch_size}")
    ids = prompts["prompt_id"].astype(int).tolist()
    texts, base_seeds = prompts["prompt"].tolist(), prompts["seed"].astype(int).tolist()
    plan = []
    for steps in sorted([*step_grid, reference_steps], reverse=True):
        for j in range(seeds_per_prompt):
            seeds = [s + j * seed_stride for s in base_seeds]
            for start in range(0, len(ids), batch_size):
                chunk = slice(start, start + batch_size)
                spec = {"settings": asdict(settings), "steps": steps, "prompt_ids": ids[chunk],
                        "prompts": texts[chunk], "seeds": seeds[chunk]}
                name = f"s{steps:04d}-p{start // batch_size:05d}" if j == 0 else \
                    f"s{steps:04d}-r{j}-p{start // batch_size:05d}"
                plan.append(ShardSpec(name=name, steps=steps, is_reference=steps == reference_steps,
                                      prompt_ids=tuple(ids[chunk]), prompts=tuple(texts[chunk]),
                                      seeds=tuple(seeds[chunk]), key=work_key(spec), replicate=j))
    return plan


# --------------------------------------------------------------------------------------------
# The work of one shard (runs in a Ray worker or in this process)
# --------------------------------------------------------------------------------------------
_PIPELINES: dict[tuple, object] = {}  # per worker process: load the model once, reuse it for every task


def _pipeline(model: str, fingerprint: str):
    import torch

    from budgetdiff.generation.loading import load_pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache_key = (model, fingerprint, device)
    if cache_key not in _PIPELINES:
        _PIPELINES.clear()
        _PIPELINES[cache_key] = load_pipeline(model, device=device)
    return _PIPELINES[cache_key]


def render_batch(settings: RenderSettings, steps: int, prompts: list[str], seeds: list[int],
                 threads: int | None = None) -> dict[str, np.ndarray]:
    """Render ``prompts`` (one seed each) at ``steps`` steps in one batch.

    Returns {"images": uint8 (B, H, W, 3), "nfe": int64 (B,)}.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    pipe = _pipeline(settings.model, settings.model_fingerprint)
    out = pipe(list(prompts), num_inference_steps=int(steps), guidance_scale=settings.guidance,
               scheduler=settings.scheduler, seed=[int(s) for s in seeds], output_type="np", progress=False)
    images = np.clip(np.rint(np.asarray(out.images) * 255.0), 0, 255).astype(np.uint8)
    return {"images": images, "nfe": np.array([r["nfe"] for r in out.records], dtype=np.int64)}


# --------------------------------------------------------------------------------------------
# Executors: yield (shard, result) as results arrive
# --------------------------------------------------------------------------------------------
Executor = Callable[[list[ShardSpec], RenderSettings], Iterator[tuple[ShardSpec, dict]]]


def local_executor(threads: int | None = None) -> Executor:
    """Render the shards one after another in this process."""

    def run(shards: list[ShardSpec], settings: RenderSettings):
        for shard in shards:
            yield shard, render_batch(settings, shard.steps, list(shard.prompts), list(shard.seeds), threads)

    return run


def init_ray(num_cpus: int, object_store_mb: int | None = None) -> str:
    """Connect to the cluster at ``RAY_ADDRESS`` when set, else start a local Ray with ``num_cpus``
    CPUs and no dashboard; returns a description. A session already started is reused."""
    import ray

    if ray.is_initialized():
        return "existing session"
    env_vars = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "BUDGETDIFF_PARAMS")
                if k in os.environ}
    runtime_env = {"env_vars": env_vars} if env_vars else None
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level="warning", log_to_driver=False)
        return f"cluster at {address}"
    kwargs = {"object_store_memory": int(object_store_mb) * 1024 * 1024} if object_store_mb else {}
    ray.init(num_cpus=num_cpus, num_gpus=None, include_dashboard=False, runtime_env=runtime_env,
             logging_level="warning", log_to_driver=False, **kwargs)
    return f"local, {num_cpus} CPU(s)"


def ray_executor(max_in_flight: int, cpus_per_task: int, gpus_per_task: float) -> Executor:
    """Submit each shard as a Ray task (at most ``max_in_flight`` at once), yield results as they
    finish. Tasks ask for ``cpus_per_task`` CPUs and, when the cluster has GPUs, ``gpus_per_task``."""
    import ray

    def run(shards: list[ShardSpec], settings: RenderSettings):
        num_gpus = gpus_per_task if ray.cluster_resources().get("GPU", 0) > 0 else 0
        task = ray.remote(render_batch).options(num_cpus=cpus_per_task, num_gpus=num_gpus, max_retries=2)
        queue, in_flight = list(shards), {}
        while queue or in_flight:
            while queue and len(in_flight) < max_in_flight:
                shard = queue.pop(0)
                ref = task.remote(settings, shard.steps, list(shard.prompts), list(shard.seeds), cpus_per_task)
                in_flight[ref] = shard
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                yield in_flight.pop(ref), ray.get(ref)

    return run


@contextmanager
def open_executor(kind: str, num_cpus: int, *, cpus_per_task: int = 1, gpus_per_task: float = 1.0,
                  object_store_mb: int | None = None, label: str = "render"):
    """Yield ``make(max_in_flight) -> Executor`` for ``kind``: "local" renders in this process
    (``cpus_per_task`` torch threads), "ray" connects to Ray (``init_ray`` with ``num_cpus`` and
    ``object_store_mb``) for the block and shuts it down after; each task asks for
    ``cpus_per_task`` CPUs and ``gpus_per_task`` GPUs. ``label`` names the params section in
    errors and messages."""
    if kind == "local":
        yield lambda max_in_flight: local_executor(threads=cpus_per_task)
        return
    if kind != "ray":
        raise ValueError(f"{label}.executor: must be 'ray' or 'local', got {kind!r}")
    print(f"{label}: Ray {init_ray(num_cpus, object_store_mb)}")
    try:
        yield lambda max_in_flight: ray_executor(max_in_flight=max_in_flight, cpus_per_task=cpus_per_task,
                                                 gpus_per_task=gpus_per_task)
    finally:
        import ray

        ray.shutdown()


# --------------------------------------------------------------------------------------------
# The run: resume, render what is left, write shards
# --------------------------------------------------------------------------------------------
def shard_arrays(shard: ShardSpec, result: dict) -> dict[str, np.ndarray]:
    n = len(shard.prompt_ids)
    if len(result["images"]) != n:
        raise RuntimeError(f"shard {shard.name}: {len(result['images'])} images for {n} prompts")
    return {"prompt_id": np.asarray(shard.prompt_ids, dtype=np.int64), **result}


def render_shards(plan: list[ShardSpec], settings: RenderSettings, store: ShardStore, executor: Executor,
                  progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Render every shard of ``plan`` that ``store`` does not already hold (same key, checksum
    verified); returns counts and timing of this run."""
    todo, reused = [], 0
    for shard in plan:
        status = store.status(shard.name, shard.key)
        if status == "done":
            reused += 1
            continue
        if status in ("corrupt", "stale"):
            log(f"render: shard {shard.name} is {status}; rendering it again")
            store.remove(shard.name)
        todo.append(shard)
    images = sum(len(s.prompt_ids) for s in plan)
    bar = tqdm(total=len(plan), initial=reused, desc="render shards", unit="shard", disable=not progress,
               dynamic_ncols=True)
    start, rendered_images, unet_steps = time.perf_counter(), 0, 0
    try:
        for shard, result in executor(todo, settings):
            store.write(shard.name, shard_arrays(shard, result), key=shard.key,
                        meta={"steps": shard.steps, "is_reference": shard.is_reference, **asdict(settings)})
            rendered_images += len(shard.prompt_ids)
            unet_steps += int(np.sum(result["nfe"]))
            bar.update(1)
            bar.set_postfix(images_per_s=f"{rendered_images / max(time.perf_counter() - start, 1e-9):.2f}")
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    return {"shards": len(plan), "shards_reused": reused, "shards_rendered": len(todo), "images": images,
            "images_rendered": rendered_images, "seconds": round(seconds, 2),
            "images_per_s": round(rendered_images / seconds, 3) if rendered_images else None,
            "network_evaluations_per_s": round(unet_steps / seconds, 2) if rendered_images else None}


def settings_for(model: str, scheduler: str, guidance: float | None) -> RenderSettings:
    """The run's settings: ``model`` checked and fingerprinted, ``scheduler`` checked, ``guidance``
    (None: the model's ``default_guidance_scale``) checked."""
    from budgetdiff.generation.loading import model_class_name
    from budgetdiff.generation.pipeline import SCHEDULERS

    model_class_name(model)  # a clear error for a missing or invalid model directory
    name = scheduler.lower()
    if name not in SCHEDULERS:
        raise ValueError(f"render.scheduler: unknown scheduler {scheduler!r}; "
                         f"choose one of {', '.join(SCHEDULERS)}")
    if guidance is None:
        guidance = json.loads((Path(model) / "model_index.json").read_text()).get("default_guidance_scale", 7.5)
    guidance = float(guidance)
    if not np.isfinite(guidance) or guidance < 0:
        raise ValueError(f"render.guidance: must be a finite number >= 0, got {guidance}")
    return RenderSettings(model=model, model_fingerprint=directory_fingerprint(model)[:32],
                          scheduler=name, guidance=guidance)


def shard_plan(cfg: RenderConfig, prompts: pd.DataFrame, settings: RenderSettings) -> list[ShardSpec]:
    """The run's shards (``plan_shards`` with the section's grid, batch size and seeds)."""
    return plan_shards(prompts, list(cfg.step_grid), cfg.reference_steps, cfg.batch_size, settings,
                       cfg.seeds_per_prompt, cfg.seed_stride)


def run(cfg: RenderConfig, executor: Executor | None = None, progress: bool = True) -> tuple[dict, dict]:
    """Render the whole plan of ``cfg`` (the params.yaml ``render`` section) and write the index;
    returns the report (deterministic: written to ``report_path``) and this run's log (timings,
    shards rendered and reused: written to ``run_log``). ``executor`` overrides
    ``cfg.executor`` (tests)."""
    settings = settings_for(cfg.model, cfg.scheduler, cfg.guidance)
    prompts = read_prompts(cfg.prompts)
    plan = shard_plan(cfg, prompts, settings)
    store = ShardStore(cfg.output_dir)
    (store.directory / INDEX_FILE).unlink(missing_ok=True)  # only a finished run has an index
    workers, cpus = cfg.workers, cfg.cpus_per_task
    kind = cfg.executor if executor is None else "given"
    if executor is not None:
        run_stats = render_shards(plan, settings, store, executor, progress=progress)
    else:
        with open_executor(kind, workers * cpus, cpus_per_task=cpus, gpus_per_task=cfg.gpus_per_task,
                           object_store_mb=cfg.local_object_store_mb) as make:
            print(f"render: {len(plan)} shards of up to {cfg.batch_size} prompts, {workers} worker(s)")
            run_stats = render_shards(plan, settings, store, make(2 * workers), progress=progress)
    removed = store.prune({s.name for s in plan}, extra_files={INDEX_FILE})
    index = {"model": settings.model, "model_fingerprint": settings.model_fingerprint,
             "scheduler": settings.scheduler, "guidance": settings.guidance,
             "step_grid": sorted(cfg.step_grid), "reference_steps": cfg.reference_steps,
             "prompts": int(len(prompts)), "seeds_per_prompt": cfg.seeds_per_prompt, "seed_stride": cfg.seed_stride,
             "batch_size": cfg.batch_size,
             "shards": [{"name": s.name, "steps": s.steps, "is_reference": s.is_reference, "rows": len(s.prompt_ids),
                         "replicate": s.replicate, "seeds": list(s.seeds), "key": s.key} for s in plan]}
    atomic_write_json(store.directory / INDEX_FILE, index)
    report = {"model": settings.model, "model_fingerprint": settings.model_fingerprint,
              "scheduler": settings.scheduler, "guidance": settings.guidance,
              "step_grid": index["step_grid"], "reference_steps": index["reference_steps"],
              "prompts": index["prompts"], "seeds_per_prompt": cfg.seeds_per_prompt, "cpus_per_task": cpus,
              "shards": len(plan), "images": run_stats["images"]}
    log = {**run_stats, "executor": kind, "workers": workers, "stale_files_removed": len(removed),
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if cfg.report_path:
        atomic_write_json(cfg.report_path, report)
    if cfg.run_log:
        atomic_write_json(cfg.run_log, log)
    return report, log


@command
def main() -> None:
    from mlops.params import load_config

    cfg = load_config("render", RenderConfig)
    report, r = run(cfg)
    print(f"render: {r['images']} images ({report['seeds_per_prompt']} seed(s) per prompt) in {r['shards']} shards "
          f"({r['shards_rendered']} rendered, "
          f"{r['shards_reused']} reused) in {r['seconds']:.0f} s -> {cfg.output_dir}")


if __name__ == "__main__":
    main()
