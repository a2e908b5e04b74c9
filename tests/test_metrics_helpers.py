"""Shared helpers of the metrics tests (no tests here): tiny random evaluator models, an oracle
attribute checker and rendered scene batches. Nothing needs trained weights or a download."""

from __future__ import annotations

import numpy as np
import torch

from budgetdiff.domain.evaluators import AttributeChecker, attribute_targets

TINY_CLIP_CFG = {
    "resolution": 32, "embed_dim": 16,
    "vision": {"width": 32, "layers": 1, "patch_size": 8, "head_width": 16},
    "text": {"width": 32, "layers": 1, "heads": 2, "context_length": 48},
}
TINY_CHECKER = {"channels": (4, 8, 8), "hidden": 16}


def tiny_clip():
    """(open_clip model, tokenizer) of a randomly initialised tiny domain CLIP (seed 0)."""
    from budgetdiff.domain.evaluators import build_domain_clip

    model, tokenizer = build_domain_clip(TINY_CLIP_CFG, seed=0)
    return model.eval(), tokenizer


def tiny_backbone():
    from budgetdiff.metrics.semantic import domain_clip_backbone

    return domain_clip_backbone(*tiny_clip())


def tiny_checker():
    from budgetdiff.domain.evaluators import AttributeChecker

    torch.manual_seed(0)
    return AttributeChecker(32, **TINY_CHECKER).eval()


def rendered_batch(n: int, offset: int = 0, n_objects: int | None = None):
    """(specs, float images (n, 3, 32, 32) in [0, 1], prompts) of scenes with seeds offset..."""
    from budgetdiff.domain.scenes import render_scene_array, sample_scene, spec_to_prompt

    specs = [sample_scene(offset + i, n_objects=n_objects) for i in range(n)]
    images = np.stack([render_scene_array(s) for s in specs])
    return specs, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, [spec_to_prompt(s) for s in specs]


def add_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (images + sigma * torch.randn(images.shape, generator=generator)).clamp(0, 1)


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    return gaussian_blur(images, [9, 9], [sigma])


NOISE_LEVELS = (0.02, 0.05, 0.1, 0.2, 0.4)
BLUR_LEVELS = (0.5, 1.0, 1.5, 2.5)


def strictly_decreasing(values) -> bool:
    return all(a > b for a, b in zip(values, values[1:]))


def strictly_increasing(values) -> bool:
    return all(a < b for a, b in zip(values, values[1:]))


class OracleChecker(AttributeChecker):
    """Answers with the ground truth of ``specs`` (logits ±10): exercises decoding and matching."""

    def __init__(self, specs):
        super().__init__(32, (4, 8, 8), 16)
        t = attribute_targets(specs)
        self.logits = {"occupied": t["occupied"] * 20 - 10,
                       "background": torch.nn.functional.one_hot(t["background"], 4) * 10.0}
        for name, size in (("shape", 5), ("color", 8), ("size", 2), ("texture", 3)):
            self.logits[name] = torch.nn.functional.one_hot(t[name].clamp(min=0), size) * 10.0

    def forward(self, images):
        return {k: v[: images.shape[0]].float() for k, v in self.logits.items()}
