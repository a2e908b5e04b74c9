"""What runs inside the Ray workers: render the prompts with a skip configuration (or at full
steps, the references) and judge the images against the references."""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def tuning_prompts(prompts_per_level: dict, offset: int) -> tuple[list[str], list[int]]:
    """bench_adaptive's prompt recipe (``budgetdiff.domain.scenes.level_prompts``) at this stage's own
    seed offset."""
    from budgetdiff.domain.scenes import level_prompts

    prompts, seeds, _ = level_prompts(prompts_per_level, offset)
    return prompts, seeds


_PIPES: dict[str, Any] = {}
_SCORERS: dict[str, Any] = {}


def cached_pipeline(model: str):
    """One loaded pipeline per worker process (Tune reuses the trial actors)."""
    if model not in _PIPES:
        from budgetdiff.generation.loading import load_pipeline

        _PIPES[model] = load_pipeline(model, "cpu")
    return _PIPES[model]


def cached_scorer(clip_dir: str | None):
    key = str(clip_dir)
    if key not in _SCORERS:
        from budgetdiff.metrics import MetricScorer, ScoringConfig

        kwargs = {"clip_dir": clip_dir} if clip_dir else {"clip_dir": "/nonexistent"}
        _SCORERS[key] = MetricScorer(ScoringConfig(skip_missing_models=True, **kwargs))
    return _SCORERS[key]


def render(ctx: dict, scheduler: str, skip: dict | None, prompts: list[str] | None = None,
           seeds: list[int] | None = None) -> tuple:
    """(images (N, 3, H, W) in [0, 1], per-image NFE, skip masks) for one batched call per
    ``batch_size`` prompts; ``skip`` None renders the full-step reference."""
    import torch

    from budgetdiff.methods.adaptive import AdaptiveSkipConfig
    from budgetdiff.generation.pipeline import BudgetDiffusionPipeline

    torch.set_num_threads(int(ctx["threads"]))
    pipe = cached_pipeline(ctx["model"])
    prompts = prompts if prompts is not None else ctx["prompts"]
    seeds = seeds if seeds is not None else ctx["seeds"]
    config = None if skip is None else AdaptiveSkipConfig(
        threshold=float(skip["threshold"]), max_skip=int(skip["max_skip"]), warmup=int(skip["warmup"]),
        reuse=str(skip["reuse"]), estimator=str(skip.get("estimator", "paper")))
    bs = int(ctx.get("batch_size") or len(prompts))
    with torch.no_grad():
        if isinstance(pipe, BudgetDiffusionPipeline):
            out = pipe.generate_in_batches(prompts, bs, seed=seeds, output_type="pt", num_inference_steps=ctx["steps"],
                                           guidance_scale=ctx["guidance"], scheduler=scheduler, adaptive=config)
            images, records = out.images.float(), out.records
        else:  # stock SD / SDXL: budgetdiff.generation.loading's path (image i uses seed + i)
            from budgetdiff.generation.loading import generate

            batches, records = [], []
            for i in range(0, len(prompts), bs):
                pil, batch_records = generate(pipe, prompts[i:i + bs], steps=ctx["steps"], guidance=ctx["guidance"],
                                              scheduler=scheduler, seed=int(seeds[i]), progress=False, adaptive=config)
                batches.append(torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in pil])
                                                ).permute(0, 3, 1, 2))
                records += batch_records
            images = torch.cat(batches)
    return images, [int(r["nfe"]) for r in records], [r.get("skip_mask") for r in records]


def judge(ctx: dict, images, refs, nfe: list[int]) -> dict:
    """Mean NFE, LPIPS and the levels of ``quality_of`` against the full-step images."""
    from budgetdiff.statistics.quality import realised_quality as quality_of

    scorer = cached_scorer(ctx.get("clip_dir"))
    values = scorer.score(images, refs=refs)
    levels = {k: float(np.nanmean(v)) for k, v in values.items() if k != "pixel/lsnr"}
    lpips_name = next(k for k in levels if k.startswith("mid/lpips"))
    mean_nfe = float(np.mean(nfe))
    return {"nfe": mean_nfe, "lpips": levels[lpips_name], "nfe_speedup": ctx["steps"] / mean_nfe,
            "quality": quality_of(levels), "lpips_name": lpips_name, "levels": levels}


def skip_trial(config: dict, ctx: dict, refs) -> dict:
    """One Tune trial: render the tuning prompts with ``config`` and judge them. The full-step
    references ``refs`` arrive through the object store (``tune.with_parameters``)."""
    start = time.perf_counter()
    images, nfe, _ = render(ctx, ctx["scheduler"], config)
    result = judge(ctx, images, refs, nfe)
    levels = result.pop("levels")
    result.pop("lpips_name")
    result.update({k.replace("/", "_"): v for k, v in levels.items()}, seconds=time.perf_counter() - start)
    return result


def reference_task(ctx: dict, scheduler: str, baselines: dict) -> dict:
    """The full-step references of one scheduler, plus the baseline configurations judged on
    the same prompts (the hand-tuned point and the paper default)."""
    start = time.perf_counter()
    refs, _, _ = render(ctx, scheduler, None)
    seconds = time.perf_counter() - start
    judged = {}
    for name, skip in baselines.items():
        images, nfe, _ = render(ctx, scheduler, skip)
        res = judge(ctx, images, refs, nfe)
        judged[name] = {"config": skip, **res}
    return {"refs": refs, "reference_seconds": seconds, "baselines": judged}


def holdout_task(ctx: dict, scheduler: str, configs: dict) -> dict:
    """Held-out check of one scheduler: full-step references and each config in ``configs``."""
    start = time.perf_counter()
    refs, _, _ = render(ctx, scheduler, None)
    out = {"reference_seconds": time.perf_counter() - start, "rows": {}}
    for name, skip in configs.items():
        t = time.perf_counter()
        images, nfe, _ = render(ctx, scheduler, skip)
        res = judge(ctx, images, refs, nfe)
        out["rows"][name] = {"config": skip, **res, "seconds": time.perf_counter() - t}
    return out
