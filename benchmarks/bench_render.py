"""DVC stage ``bench_render``: how fast the render stage renders on this machine.

Images/s for ``prompts`` prompts at ``steps`` steps, in shards of ``batch_size`` prompts, with each
worker count of ``workers`` (Ray tasks of ``cpus_per_task`` torch threads each, as the render stage
runs them; the images are not kept). Each measurement starts after a warm-up task per worker, so
that loading the model is not counted. The ratio of the largest worker count to one worker is the
scaling figure; host facts (CPU count, platform) are reported beside it.

This was the render stage's "throughput probe". It is its own stage so that the rendered data
stays deterministic: timings differ from run to run, and nothing depends on this report.

Params: the model, prompts, scheduler, guidance, batch size and resources per task are the render
section's (``RenderConfig``); ``bench_render`` sets the rest. Output: ``report_path``
(reports/bench_render.json).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from budgetdiff.io import atomic_write_json
from mlops.cli import command
from pipelines.render import Executor, RenderConfig, RenderSettings, ShardSpec, open_executor, plan_shards, settings_for
from pipelines.schema import read_prompts


@dataclass(frozen=True)
class BenchRenderConfig:
    """The ``bench_render`` section of params.yaml."""

    prompts_measured: int
    steps: int
    workers: list[int]
    report_path: str


def throughput(prompts: pd.DataFrame, settings: RenderSettings, n: int, steps: int, batch: int,
               workers: list[int], make_executor) -> dict:
    """Images/s and network evaluations/s for ``n`` prompts (``prompts`` repeated as needed) at
    ``steps`` steps in shards of ``batch``, with each worker count of ``workers``."""
    if n < 1 or steps < 1 or batch < 1 or not workers or any(int(w) < 1 for w in workers):
        raise ValueError(f"bench_render: prompts_measured, steps, batch_size and workers must be positive, "
                         f"got {n}, {steps}, {batch}, {workers}")
    rows = prompts.iloc[np.arange(n) % len(prompts)].assign(prompt_id=np.arange(n))
    plan = [s for s in plan_shards(rows, [steps], steps + 1, batch, settings) if s.steps == steps]
    out = {"prompts": n, "steps": steps, "batch_size": batch, "images_per_s": {}, "network_evaluations_per_s": {},
           "seconds": {}}
    for w in (int(w) for w in workers):
        run: Executor = make_executor(w)
        warm = [ShardSpec(f"warm{i}", 1, False, (0,), plan[0].prompts[:1], (0,), "") for i in range(w)]
        for _ in run(warm, settings):
            pass
        start, evals = time.perf_counter(), 0
        for _, result in run(plan, settings):
            evals += int(np.sum(result["nfe"]))
        seconds = time.perf_counter() - start
        out["images_per_s"][str(w)] = round(n / seconds, 3)
        out["network_evaluations_per_s"][str(w)] = round(evals / seconds, 2)
        out["seconds"][str(w)] = round(seconds, 2)
        print(f"bench_render: {w} worker(s): {n / seconds:.2f} images/s at {steps} steps")
    return out


def run(cfg: BenchRenderConfig, render: RenderConfig, executor: str = "ray") -> dict:
    """Measure per ``cfg`` (the params.yaml ``bench_render`` section) with the render stage's
    settings ``render`` (its section: model, prompts, scheduler, guidance, batch size, resources
    per task); returns the report. ``executor``: ``ray`` or ``local`` (tests use ``local``)."""
    settings = settings_for(render.model, render.scheduler, render.guidance)
    prompts = read_prompts(render.prompts)
    workers = cfg.workers
    cpus = render.cpus_per_task
    with open_executor(executor, max(workers) * cpus, cpus_per_task=cpus, gpus_per_task=render.gpus_per_task,
                       object_store_mb=render.local_object_store_mb, label="bench_render") as make:
        # w workers: at most w shards in flight (the local executor renders one at a time)
        result = throughput(prompts, settings, cfg.prompts_measured, cfg.steps, render.batch_size, workers, make)
    top = str(max(workers))
    scaling = (round(result["images_per_s"][top] / result["images_per_s"]["1"], 3)
               if "1" in result["images_per_s"] and top != "1" else None)
    report = {"model": settings.model, "scheduler": settings.scheduler, "guidance": settings.guidance,
              "executor": executor, "cpus_per_task": cpus, **result,
              f"speedup_{top}_vs_1_workers": scaling,
              "host": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "processor": platform.machine()}}
    atomic_write_json(cfg.report_path, report)
    return report


@command
def main() -> None:
    from mlops.params import load_config

    render = load_config("render", RenderConfig)  # the render stage's section: bench what it runs
    cfg = load_config("bench_render", BenchRenderConfig)
    report = run(cfg, render)
    print(f"bench_render: {report['images_per_s']} images/s by workers -> {cfg.report_path}")


if __name__ == "__main__":
    main()
