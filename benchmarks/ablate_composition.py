"""DVC stage ``ablate_composition``: how does the embedded model fail on multi-object prompts?

The model gets every attribute right on most 1-object prompts but few 2-object ones
(``reports/base.json``). This looks at *how* it fails, on held-out prompts with a fixed object
count, judged by the trained attribute checker (``models/attributes``, which reads ground truth
at 100 %): how many objects it draws, whether each prompt object is in its cell, and, for an
object in the right cell, whether its colour and shape are right or were taken from the other
object of the prompt (attribute leakage, the binding failure known from Stable Diffusion). Each
guidance scale of ``guidances`` is measured on the same prompts and seeds, since the default
guidance was chosen on 1-object prompts only.

Params: ``ablate_composition`` in params.yaml. Output: ``report_path`` (JSON).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from budgetdiff.domain.evaluators import detect_scenes, images_to_tensor, load_attribute_checker
from budgetdiff.io import atomic_write_json
from budgetdiff.generation.pipeline import BudgetDiffusionPipeline
from budgetdiff.domain.scenes import held_out_scenes
from mlops.cli import command
from mlops.params import load_config


@dataclass(frozen=True)
class AblateCompositionConfig:
    """The ``ablate_composition`` section of params.yaml."""

    model: str
    checker: str
    n_objects: int
    prompts: int
    seed_offset: int
    steps: int
    guidances: list[float]
    batch_size: int
    report_path: str


def failure_modes(detected, specs) -> dict:
    """Shares over prompt objects of each way to be right or wrong, the share of scenes with every
    attribute right (no extra object, right background), and the detected object counts."""
    per_object: Counter = Counter()
    counts: Counter = Counter()
    scene_all = []
    for det, spec in zip(detected, specs):
        counts[len(det.objects)] += 1
        by_cell = {d.position: d for d in det.objects}
        ok_scene = set(by_cell) <= {o.position for o in spec.objects} and det.background == spec.background
        for o in spec.objects:
            others = [p for p in spec.objects if p is not o]
            d = by_cell.get(o.position)
            right = d is not None and all(getattr(d, a) == getattr(o, a) for a in ("shape", "color", "size", "texture"))
            ok_scene = ok_scene and right
            per_object.update({
                "in_cell": d is not None,
                "color_right": d is not None and d.color == o.color,
                "shape_right": d is not None and d.shape == o.shape,
                "size_right": d is not None and d.size == o.size,
                "color_from_other": d is not None and d.color != o.color and any(p.color == d.color for p in others),
                "shape_from_other": d is not None and d.shape != o.shape and any(p.shape == d.shape for p in others),
                "all_right": right,
            })
        scene_all.append(ok_scene)
    n = sum(len(s.objects) for s in specs)
    return {"scenes_all_right": round(float(np.mean(scene_all)), 4),
            "per_object": {k: round(v / n, 4) for k, v in per_object.items()},
            "detected_object_counts": {str(k): v for k, v in sorted(counts.items())}}


def run(cfg: AblateCompositionConfig) -> dict:
    t0 = time.time()
    pipe = BudgetDiffusionPipeline.from_pretrained(cfg.model)
    pipe.set_progress_bar_config(disable=True)
    checker = load_attribute_checker(cfg.checker)
    specs, prompts = held_out_scenes(cfg.prompts, cfg.seed_offset, n_objects=cfg.n_objects)
    results = {}
    for g in cfg.guidances:
        images = pipe.generate_in_batches(prompts, cfg.batch_size, seed=0, output_type="np",
                                          num_inference_steps=cfg.steps, guidance_scale=g,
                                          scheduler="ddim").images
        detected = detect_scenes(checker, images_to_tensor(images))
        results[str(g)] = failure_modes(detected, specs)
        print(f"ablate_composition: guidance {g}: all right {results[str(g)]['scenes_all_right']:.3f} "
              f"{results[str(g)]['per_object']}", flush=True)
    report = {"what": f"failure modes of {cfg.model} on {cfg.n_objects}-object held-out prompts",
              "judge": cfg.checker, "steps": cfg.steps, "prompts": cfg.prompts, "by_guidance": results,
              "seconds": round(time.time() - t0, 1)}
    atomic_write_json(cfg.report_path, report)
    return report


@command
def main() -> None:
    run(load_config("ablate_composition", AblateCompositionConfig))


if __name__ == "__main__":
    main()
