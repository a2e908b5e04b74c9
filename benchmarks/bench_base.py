"""Benchmark stage ``bench_base``: how well does the embedded model follow its prompts?

On held-out prompts (a seed range no training or tuning run uses), generate at the model's
default guidance and judge each image against the renderer's ground truth with two checkers:
the trained attribute checker (``budgetdiff.domain.evaluators.attr_check``, stage train_attributes;
the primary judge) and the training-free heuristic one (``check_scene_heuristic``). Each
checker run on the rendered ground-truth images gives its own ceiling, reported beside the
model's scores.
Writes reports/base.json, a guidance sweep, and sample grids (prompt, then the image at each of
``grid_steps``) as PNG.
"""

from __future__ import annotations

import json
import textwrap
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from budgetdiff.domain.evaluators import attr_check, check_scene_heuristic, load_attribute_checker, summarize_checks
from budgetdiff.generation.loading import load_pipeline
from budgetdiff.io import atomic_write_bytes, atomic_write_json, png_bytes
from budgetdiff.domain.scenes import held_out_scenes, level_seed, render_scene_array, sample_scene, spec_to_prompt
from mlops.cli import command

CHECKERS = {"primary": "trained attribute checker (models/attributes)", "heuristic": "heuristic_v1"}
Scheduler = Literal["ddim", "dpmpp", "euler"]  # budgetdiff.generation.pipeline.SCHEDULERS


@dataclass(frozen=True)
class BenchBaseConfig:
    """The ``bench_base`` section of params.yaml."""

    model: str
    steps: int
    scheduler: Scheduler
    guidance: Optional[float]
    batch_size: int
    seed_offset: int
    prompts_per_level: dict[int, int]
    sweep_prompts: int
    guidance_sweep: list[float]
    targets_1_object: dict[str, float]  # attribute (as attr_check names it) -> minimum accuracy
    grid_prompts: int
    grid_steps: list[int]
    attributes_dir: str
    report_path: str
    grid_path: str


def generate_np(pipe, prompts, steps, guidance, scheduler, batch_size, desc):
    """(images: list of (H, W, 3) arrays in [0, 1], seconds per image); image i uses seed i."""
    out = pipe.generate_in_batches(prompts, batch_size, seed=0, output_type="np", desc=desc,
                                   num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler)
    return list(out.images), sum(r["seconds"] for r in out.records) / max(1, len(prompts))


def score(images, specs, checker) -> dict:
    """{"checker": trained-checker accuracies, "heuristic": heuristic-checker accuracies}."""
    return {
        "checker": attr_check(np.stack(images), specs, checker=checker),
        "heuristic": summarize_checks([check_scene_heuristic(img, s) for img, s in zip(images, specs)]),
    }


def sample_grid(pipe, specs, prompts, steps_list, guidance, scheduler, cell: int = 96) -> Image.Image:
    """Rows: prompt text, ground truth, then the image at each step count (same seed)."""
    text_w = 260
    cols = ["ground truth"] + [f"{s} steps" for s in steps_list]
    header = 18
    grid = Image.new("RGB", (text_w + cell * len(cols), header + cell * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(cols):
        draw.text((text_w + j * cell + 4, 3), name, fill="black")
    per_steps = {
        s: pipe(prompts, num_inference_steps=s, guidance_scale=guidance, scheduler=scheduler, seed=0,
                progress=False).images
        for s in steps_list
    }
    for i, (spec, prompt) in enumerate(zip(specs, prompts)):
        y = header + i * cell
        draw.multiline_text((4, y + 4), "\n".join(textwrap.wrap(prompt, 42)), fill="black", spacing=2)
        row = [Image.fromarray(render_scene_array(spec))] + [per_steps[s][i] for s in steps_list]
        for j, img in enumerate(row):
            grid.paste(img.resize((cell - 4, cell - 4), Image.Resampling.NEAREST), (text_w + j * cell + 2, y + 2))
    return grid


def run(cfg: BenchBaseConfig) -> dict:
    torch.manual_seed(0)
    pipe = load_pipeline(cfg.model)
    checker = load_attribute_checker(cfg.attributes_dir)
    guidance = float(pipe.config.default_guidance_scale if cfg.guidance is None else cfg.guidance)
    steps, sched, bs = cfg.steps, cfg.scheduler, cfg.batch_size
    report = {"model": cfg.model, "checkers": CHECKERS, "steps": steps, "scheduler": sched,
              "guidance": guidance, "levels": {}}
    start = time.time()
    for n_obj, n in cfg.prompts_per_level.items():
        specs, prompts = held_out_scenes(n, level_seed(cfg.seed_offset, n_obj, 0), n_objects=n_obj)
        images, sec = generate_np(pipe, prompts, steps, guidance, sched, bs, f"{n_obj} object(s)")
        if int(n_obj) == 1:
            one_object_images = images
        truth = [render_scene_array(s).astype(np.float32) / 255.0 for s in specs]
        report["levels"][str(n_obj)] = {
            "prompts": n,
            "model": score(images, specs, checker),
            "checkers_on_ground_truth": score(truth, specs, checker),
            "seconds_per_image": sec,
        }
        print(f"[{n_obj} object(s), n={n}] " + " ".join(
            f"{k}={v:.3f}" for k, v in report["levels"][str(n_obj)]["model"]["checker"].items()))
    # Guidance sweep on the first 1-object prompts (same prompts and seeds as above, so the
    # default guidance's images are reused): how the default was chosen, measured again here.
    n_sweep = cfg.sweep_prompts
    specs, prompts = held_out_scenes(n_sweep, level_seed(cfg.seed_offset, 1, 0), n_objects=1)
    report["guidance_sweep_1_object"] = {"prompts": n_sweep}
    for g in sorted(set(cfg.guidance_sweep) | {guidance}):
        images = one_object_images[:n_sweep] if g == guidance else generate_np(
            pipe, prompts, steps, g, sched, bs, f"guidance {g}")[0]
        report["guidance_sweep_1_object"][str(g)] = score(images, specs, checker)
    targets = cfg.targets_1_object
    one = report["levels"]["1"]["model"]["checker"]
    report["targets_1_object"] = {k: {"target": v, "measured": one[k], "met": one[k] >= v} for k, v in targets.items()}
    report["seconds_total"] = round(time.time() - start, 1)

    grid_specs = [sample_scene(cfg.seed_offset + 900_000 + i, n_objects=1 + i % 4) for i in range(cfg.grid_prompts)]
    grid = sample_grid(pipe, grid_specs, [spec_to_prompt(s) for s in grid_specs], cfg.grid_steps, guidance, sched)
    atomic_write_bytes(cfg.grid_path, png_bytes(grid))
    return report


@command
def main() -> None:
    from mlops.params import load_config
    from mlops.tracking import EXPERIMENT, run_tags, tracking_uri

    cfg = load_config("bench_base", BenchBaseConfig)
    report = run(cfg)
    atomic_write_json(cfg.report_path, report)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="bench_base", tags=run_tags("bench_base")):
        for level, r in report["levels"].items():
            mlflow.log_metrics({f"bench_base/{level}obj_{k}": v for k, v in r["model"]["checker"].items()})
        mlflow.log_artifact(cfg.report_path)
        mlflow.log_artifact(cfg.grid_path)
    print(json.dumps(report["targets_1_object"]))


if __name__ == "__main__":
    main()
