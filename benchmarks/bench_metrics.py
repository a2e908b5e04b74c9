"""Benchmark stage ``bench_metrics``: are the metrics' evaluator models good enough, and how fast
is the batched scoring API?

Writes reports/metrics.json with
- the domain CLIP's image-to-text top-1 retrieval accuracy on held-out scenes (overall and per
  object count),
- the attribute checker's accuracies per attribute on held-out rendered scenes of 1 to 4 objects
  (target: >= 95 % on colour, shape, size and position for 1-object scenes),
- Fréchet-distance sanity numbers (``dist/fd_domainclip``): rendered vs rendered (other seeds)
  should be small, rendered vs noisy renders larger, rendered vs pure noise large,
- scoring throughput (images/s on this machine) of ``MetricScorer.score`` with every metric.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from budgetdiff.domain.evaluators import check_scenes, load_attribute_checker, summarize_attribute_checks
from budgetdiff.io import atomic_write_json
from budgetdiff.metrics import MetricScorer, ScoringConfig
from budgetdiff.metrics.semantic import load_clip_backbone
from budgetdiff.domain.scenes import render_scene_array, sample_scene, spec_to_prompt
from mlops.cli import command

SEED_OFFSET = 50_000_000  # a seed range of its own: no training stream or training evaluation uses it


@dataclass(frozen=True)
class BenchMetricsConfig:
    """The ``bench_metrics`` section of params.yaml."""

    clip_dir: str
    attributes_dir: str
    retrieval_scenes: int
    attr_scenes_per_count: int
    fd_images: int
    fd_noise_sigmas: list[float]
    throughput_images: int
    batch_size: int
    report_path: str


def rendered(n: int, offset: int, n_objects: int | None = None):
    """(specs, uint8 images (n, 32, 32, 3), prompts) of ``n`` scenes from seeds ``offset``..."""
    specs = [sample_scene(offset + i, n_objects=n_objects, count_weights=(0.25,) * 4) for i in range(n)]
    return specs, np.stack([render_scene_array(s) for s in specs]), [spec_to_prompt(s) for s in specs]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def run(cfg: BenchMetricsConfig) -> dict:
    from training.clip import retrieval_accuracy

    torch.manual_seed(0)
    report: dict = {"torch_threads": torch.get_num_threads()}
    backbone = load_clip_backbone(cfg.clip_dir)
    checker = load_attribute_checker(cfg.attributes_dir)

    # 1. Domain CLIP retrieval.
    specs, images, prompts = rendered(cfg.retrieval_scenes, SEED_OFFSET)
    report["domain_clip_retrieval"] = retrieval_accuracy(backbone.model, backbone.tokenizer, specs,
                                                         to_tensor(images), prompts)
    report["domain_clip_retrieval"]["candidates"] = len(prompts)

    # 2. Attribute checker per object count.
    report["attribute_checker"] = {}
    for k in (1, 2, 3, 4):
        specs_k, images_k, _ = rendered(cfg.attr_scenes_per_count, SEED_OFFSET + 1_000_000 * k, n_objects=k)
        report["attribute_checker"][f"{k}obj"] = summarize_attribute_checks(check_scenes(checker, images_k, specs_k))
    one = report["attribute_checker"]["1obj"]
    report["attribute_checker"]["target_1obj_met"] = all(one[a] >= 0.95 for a in ("color", "shape", "size", "position"))

    # 3. Fréchet distance sanity.
    scorer = MetricScorer(ScoringConfig(batch_size=cfg.batch_size), clip=backbone, checker=checker)
    n = cfg.fd_images
    a = to_tensor(rendered(n, SEED_OFFSET + 10_000_000)[1])
    b = to_tensor(rendered(n, SEED_OFFSET + 11_000_000)[1])
    fd = {"rendered_vs_rendered": scorer.frechet_distance(a, b)}
    for sigma in cfg.fd_noise_sigmas:
        fd[f"rendered_vs_noisy_sigma{sigma}"] = scorer.frechet_distance(a, (b + sigma * torch.randn_like(b)).clamp(0, 1))
    fd["rendered_vs_uniform_noise"] = scorer.frechet_distance(a, torch.rand_like(b))
    report["fd_sanity"] = {k: next(iter(v.values())) for k, v in fd.items()}
    report["fd_sanity"]["metric"] = next(iter(fd["rendered_vs_rendered"]))
    report["fd_sanity"]["images_per_set"] = n

    # 4. Throughput of the batched API with every per-image metric (reference + prompt).
    m = cfg.throughput_images
    _, imgs, prompts = rendered(m, SEED_OFFSET + 20_000_000)
    refs = rendered(m, SEED_OFFSET + 20_000_000)[1]
    noisy = np.clip(imgs.astype(np.float32) / 255 + np.random.default_rng(0).normal(0, 0.05, imgs.shape), 0, 1)
    scorer.score(noisy[:8], refs[:8], prompts[:8])  # warm-up: loads LPIPS
    start = time.perf_counter()
    values = scorer.score(noisy.astype(np.float32), refs, prompts)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    scorer.score(noisy.astype(np.float32))
    pixel_seconds = time.perf_counter() - start
    report["throughput"] = {
        "images": m, "resolution": int(imgs.shape[1]), "batch_size": cfg.batch_size,
        "all_metrics_images_per_s": round(m / seconds, 1),
        "no_reference_no_prompt_images_per_s": round(m / pixel_seconds, 1),
        "metrics": sorted(values), "cpu_count": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    report["metric_means_noisy_sigma0.05"] = {k: float(np.nanmean(v)) for k, v in values.items()}
    return report


@command
def main() -> None:
    from mlops.params import load_config

    cfg = load_config("bench_metrics", BenchMetricsConfig)
    report = run(cfg)
    atomic_write_json(cfg.report_path, report)
    print(json.dumps({"retrieval_top1": report["domain_clip_retrieval"]["image_to_text_top1"],
                      "attr_1obj": report["attribute_checker"]["1obj"], "fd": report["fd_sanity"],
                      "images_per_s": report["throughput"]["all_metrics_images_per_s"]}))


if __name__ == "__main__":
    main()
