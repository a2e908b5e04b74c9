"""Multi-level perceptual metrics, one file per level, and the batched scoring API.

| level | metrics (names as in ARCHITECTURE.md) | needs | file |
|---|---|---|---|
| pixel | ``pixel/psnr``, ``pixel/ssim`` (reference), ``pixel/lsnr`` (none) | - | pixel.py |
| mid | ``mid/lpips_alex`` or ``mid/lpips_alex_randinit`` | reference | perceptual.py |
| high | ``high/iclip_domainclip`` (reference), ``high/clipt_domainclip`` (prompt) | models/clip | semantic.py |
| domain | ``domain/attr_acc`` (scene prompt; scores the attributes it states) | models/attributes | ../evaluators.py |
| distributional | ``dist/fd_domainclip`` (two image sets) | models/clip | distributional.py |

    >>> scorer = MetricScorer(ScoringConfig(progress=True))
    >>> values = scorer.score(images, refs=refs, prompts=prompts)   # {name: np.ndarray (N,)}

Images are float tensors (N, 3, H, W) in [0, 1], uint8/float arrays (N, H, W, 3), or lists of
PIL images/arrays of one size. Models load lazily, on the first metric that needs them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from budgetdiff.domain.evaluators import (
    ATTRIBUTE_CHECKER_DIR,
    DOMAIN_CLIP_DIR,
    EvaluatorModelError,
    check_scenes,
    images_to_tensor,
    load_attribute_checker,
    scene_attr_acc,
)
from budgetdiff.domain.parse import parse_stated_scene
from budgetdiff.domain.scenes import PromptParseError
from budgetdiff.metrics.distributional import fd_name, frechet_distance
from budgetdiff.metrics.perceptual import LPIPS_NAME, LPIPS_RANDINIT_NAME, LpipsMetric
from budgetdiff.metrics.pixel import lsnr, psnr, ssim
from budgetdiff.metrics.semantic import ClipBackbone, clipt, iclip, load_clip_backbone

__all__ = [
    "ScoringConfig", "MetricScorer", "resize_to", "images_to_tensor",
    "psnr", "ssim", "lsnr", "LpipsMetric", "ClipBackbone", "load_clip_backbone", "iclip", "clipt",
    "frechet_distance", "LPIPS_NAME", "LPIPS_RANDINIT_NAME",
]


@dataclass
class ScoringConfig:
    """Where the scorer finds its models and how it batches.

    Attributes:
        clip_dir: domain CLIP directory (default models/clip, DVC stage ``train_clip``).
        attributes_dir: attribute checker directory (default models/attributes, ``train_attributes``).
        pretrained_clip_model / pretrained_clip_weights: an open_clip architecture and a local
            checkpoint file to use instead of the domain CLIP (both or neither; default neither).
        alexnet_weights: local ImageNet AlexNet checkpoint for LPIPS (default: torch hub cache).
        lpips_min_size: LPIPS upsamples smaller images to this side (default 64).
        skip_missing_models: when a model directory is missing, leave its metrics out (with one
            warning) instead of raising ``EvaluatorModelError`` (default False).
        batch_size: images per forward pass (default 256).
        device: torch device (default "cpu").
        progress: show a tqdm bar over batches (default False).
    """

    clip_dir: str = DOMAIN_CLIP_DIR
    attributes_dir: str = ATTRIBUTE_CHECKER_DIR
    pretrained_clip_model: str | None = None
    pretrained_clip_weights: str | None = None
    alexnet_weights: str | None = None
    lpips_min_size: int = 64
    skip_missing_models: bool = False
    batch_size: int = 256
    device: str = "cpu"
    progress: bool = False


def resize_to(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (N, 3, H, W) images to ``size`` (H, W): area averaging when shrinking, bilinear
    when enlarging."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrinking = images.shape[-2] >= size[0] and images.shape[-1] >= size[1]
    if shrinking:
        return F.interpolate(images, size=size, mode="area")
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


class MetricScorer:
    """Computes every metric that applies to a batch of images (the batched API).

    Per image: ``pixel/lsnr`` always; with references ``pixel/psnr``, ``pixel/ssim``, LPIPS
    and ``high/iclip_*``; with prompts ``high/clipt_*`` and ``domain/attr_acc`` over the
    attributes the prompt states (``parse.parse_stated_scene``: all of them for the domain's own
    prompts; NaN for a prompt it cannot read). Per pair of sets: ``dist/fd_*`` via
    ``frechet_distance``.

    Args:
        config: a ``ScoringConfig`` (default: the repository's model directories, CPU).
        lpips / clip / checker: already loaded components to use instead of loading them
            (tests pass tiny random ones).
    """

    def __init__(self, config: ScoringConfig | None = None, lpips: LpipsMetric | None = None,
                 clip: ClipBackbone | None = None, checker=None):
        self.config = config or ScoringConfig()
        self._lpips, self._clip, self._checker = lpips, clip, checker
        self._missing: dict[str, str] = {}

    # -- lazily loaded components ------------------------------------------------------------
    @property
    def lpips(self) -> LpipsMetric:
        if self._lpips is None:
            self._lpips = LpipsMetric(self.config.alexnet_weights, self.config.lpips_min_size).to(self.config.device)
        return self._lpips

    def _load_optional(self, key: str, loader):
        if key in self._missing:
            return None
        try:
            return loader()
        except EvaluatorModelError as exc:
            if not self.config.skip_missing_models:
                raise
            self._missing[key] = str(exc)
            warnings.warn(f"{exc}; its metrics are left out", stacklevel=3)
            return None

    @property
    def clip(self) -> ClipBackbone | None:
        if self._clip is None:
            c = self.config
            self._clip = self._load_optional("clip", lambda: load_clip_backbone(
                c.clip_dir, c.pretrained_clip_model, c.pretrained_clip_weights, c.device))
        return self._clip

    @property
    def checker(self):
        if self._checker is None:
            self._checker = self._load_optional(
                "checker", lambda: load_attribute_checker(self.config.attributes_dir, self.config.device))
        return self._checker

    # -- scoring -----------------------------------------------------------------------------
    def _score_batch(self, images: torch.Tensor, refs: torch.Tensor | None, prompts: Sequence[str] | None) -> dict:
        out: dict[str, np.ndarray] = {"pixel/lsnr": lsnr(images).numpy()}
        if refs is not None:
            out["pixel/psnr"] = psnr(images, refs).numpy()
            out["pixel/ssim"] = ssim(images, refs).numpy()
            lp = self.lpips
            out[lp.name] = lp(images.to(self.config.device), refs.to(self.config.device)).cpu().numpy()
            if self.clip is not None:
                out[f"high/iclip_{self.clip.name}"] = iclip(self.clip, images, refs).numpy()
        if prompts is not None:
            if self.clip is not None:
                out[f"high/clipt_{self.clip.name}"] = clipt(self.clip, images, list(prompts)).numpy()
            if self.checker is not None:
                out["domain/attr_acc"] = self._attr_acc(images, prompts)
        return out

    def _attr_acc(self, images: torch.Tensor, prompts: Sequence[str]) -> np.ndarray:
        values = np.full(len(prompts), np.nan)
        specs, keep = [], []
        read: dict[str, object] = {}  # a batch repeats its prompts (one per step count and seed)
        for i, prompt in enumerate(prompts):
            if prompt not in read:
                try:
                    read[prompt] = parse_stated_scene(prompt)
                except PromptParseError:
                    read[prompt] = None
            if read[prompt] is not None:
                specs.append(read[prompt])
                keep.append(i)
        if keep:
            checks = check_scenes(self.checker, images[keep].to(self.config.device), specs)
            values[keep] = [scene_attr_acc(c) for c in checks]
        return values

    def score(self, images, refs=None, prompts: Sequence[str] | None = None, resize: bool = False) -> dict[str, np.ndarray]:
        """Every applicable per-image metric for ``images``, as {name: array (N,)}.

        Args:
            images: the images to judge (see the module docstring for accepted forms).
            refs: one reference image per image (default None: no reference metrics).
            prompts: one prompt per image (default None: no prompt metrics).
            resize: resize each image to its reference's size instead of raising (default False).

        Raises:
            ValueError: mismatched counts or sizes, or an empty prompt.
        """
        images = images_to_tensor(images).clamp(0, 1)
        n = images.shape[0]
        if refs is not None:
            refs = images_to_tensor(refs).clamp(0, 1)
            if refs.shape[0] != n:
                raise ValueError(f"{n} images but {refs.shape[0]} references")
            if images.shape[-2:] != refs.shape[-2:]:
                if not resize:
                    raise ValueError(f"image size {tuple(images.shape[-2:])} differs from reference size "
                                     f"{tuple(refs.shape[-2:])} (resize=True resizes the image)")
                images = resize_to(images, tuple(refs.shape[-2:]))
        if prompts is not None:
            prompts = list(prompts)
            if len(prompts) != n:
                raise ValueError(f"{n} images but {len(prompts)} prompts")
            if any(not p or not p.strip() for p in prompts):
                raise ValueError("prompt: empty text has no CLIP-T score")
        starts = range(0, n, self.config.batch_size)
        if self.config.progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="scoring", unit="batch")
        parts: list[dict] = []
        for i in starts:
            j = i + self.config.batch_size
            parts.append(self._score_batch(images[i:j], None if refs is None else refs[i:j],
                                           None if prompts is None else prompts[i:j]))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}

    def score_one(self, image, ref=None, prompt: str | None = None, resize: bool = False) -> dict[str, float]:
        """``score`` for a single image (PIL image or (H, W, 3) array); {name: float}."""
        values = self.score([image], None if ref is None else [ref], None if prompt is None else [prompt], resize)
        return {k: float(v[0]) for k, v in values.items()}

    def frechet_distance(self, images_a, images_b) -> dict[str, float]:
        """{``dist/fd_<backbone>``: Fréchet distance between the two image sets}; empty when
        the CLIP backbone is missing and ``skip_missing_models`` is set."""
        if self.clip is None:
            return {}
        a, b = images_to_tensor(images_a), images_to_tensor(images_b)
        return {fd_name(self.clip): frechet_distance(self.clip, a, b, self.config.batch_size)}

    @property
    def missing_models(self) -> dict[str, str]:
        """Components skipped because their directory is missing: {component: message}."""
        return dict(self._missing)
