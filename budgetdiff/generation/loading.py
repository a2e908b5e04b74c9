"""Load a model directory and generate with it: the embedded model or a stock SD 1.5 / SDXL.

The embedded model runs through :class:`BudgetDiffusionPipeline`; a local Stable Diffusion 1.5
or SDXL diffusers directory runs through its stock diffusers pipeline with the same options
(scheduler by name, steps, guidance, seed) and returns the same per-image records.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from budgetdiff.methods.adaptive import AdaptiveSkipConfig, apply_adaptive_skip
from budgetdiff.generation.pipeline import BudgetDiffusionPipeline, check_scheduler, make_scheduler, scheduler_name

STOCK_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
SUPPORTED_PIPELINES = (BudgetDiffusionPipeline.__name__,) + STOCK_PIPELINES


class ModelDirectoryError(ValueError):
    """The model directory is missing or is not a diffusers pipeline this tool can run."""


def model_class_name(model_dir: str | Path) -> str:
    """The pipeline class named by ``model_dir/model_index.json``; raises ModelDirectoryError."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelDirectoryError(f"model: directory {str(path)!r} does not exist")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelDirectoryError(f"model: {str(path)!r} has no model_index.json (not a diffusers pipeline directory)")
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError) as exc:
        raise ModelDirectoryError(f"model: {index} is not a valid model index ({exc})") from None
    if name not in SUPPORTED_PIPELINES:
        raise ModelDirectoryError(f"model: unsupported pipeline {name!r}; supported: {', '.join(SUPPORTED_PIPELINES)}")
    return name


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(model_dir: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """Load ``model_dir`` offline with ``DiffusionPipeline.from_pretrained``.

    fp16 on CUDA, fp32 on CPU unless ``dtype`` says otherwise.
    """
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()  # loading bars: noise on stderr around one-line errors
    transformers.utils.logging.disable_progress_bar()
    model_class_name(model_dir)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelDirectoryError(f"model: cannot load {str(model_dir)!r}: {first}") from None
    pipe.set_progress_bar_config(leave=False)
    return pipe.to(device)


def check_generation_args(prompts: list[str], steps: int, guidance: float | None, scheduler: str | None) -> None:
    """A stock pipeline's argument checks (``RequestError`` naming the field): the rules
    ``BudgetDiffusionPipeline.check_inputs`` applies to its own calls."""
    BudgetDiffusionPipeline.check_inputs(prompts, steps, 1.0 if guidance is None else guidance)
    if scheduler is not None:
        check_scheduler(scheduler)


def generate(
    pipe,
    prompts: list[str],
    steps: int = 50,
    guidance: float | None = None,
    scheduler: str | None = None,
    seed: int = 0,
    progress: bool = True,
    adaptive: AdaptiveSkipConfig | None = None,
) -> tuple[list, list[dict[str, Any]]]:
    """Generate one PIL image per prompt with either pipeline kind; returns (images, records).

    ``adaptive`` turns on AdaptiveDiffusion skipping; records then carry ``skip_mask`` and the
    per-image ``nfe``.
    """
    if isinstance(pipe, BudgetDiffusionPipeline):  # checks its own inputs
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler,
                   seed=seed, progress=progress, adaptive=adaptive)
        return out.images, out.records

    # Stock SD / SDXL: swap the scheduler by name, keep the model's own timestep spacing.
    check_generation_args(prompts, steps, guidance, scheduler)
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    guidance = 7.5 if guidance is None else guidance
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    n_steps = 0
    skipper = apply_adaptive_skip(pipe, adaptive) if adaptive is not None else None

    def on_step_end(_pipe, i, t, kwargs):
        nonlocal n_steps
        n_steps += 1  # one batched (conditional + unconditional) UNet call per step
        return skipper.callback(_pipe, i, t, kwargs) if skipper is not None else kwargs

    pipe.set_progress_bar_config(disable=not progress)
    start = time.perf_counter()
    try:
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                   callback_on_step_end=on_step_end)
    finally:
        if skipper is not None:
            skipper.remove()
    seconds = (time.perf_counter() - start) / len(prompts)
    nfes = skipper.nfe() if skipper is not None else [n_steps] * len(prompts)
    records = []
    for i, p in enumerate(prompts):
        record = {"prompt": p, "steps": steps, "nfe": nfes[i], "seconds": seconds,
                  "scheduler": scheduler_name(pipe.scheduler), "guidance": guidance, "seed": seed + i,
                  "batch_size": len(prompts)}
        if skipper is not None:
            record.update(skip_mask=skipper.skip_masks()[i], adaptive=adaptive.to_record())
        records.append(record)
    return out.images, records
