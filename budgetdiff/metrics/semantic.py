"""High-level metrics with a CLIP backbone (open_clip): I-CLIP and CLIP-T.

- ``high/iclip_<backbone>``: cosine similarity of the CLIP image embeddings of an image and its
  reference (BudgetFusion's high-level metric); 1 for identical images.
- ``high/clipt_<backbone>``: cosine similarity of the image embedding and the prompt's text
  embedding (the raw CLIP score SnapFusion reports, e.g. 0.30; not CLIPScore's 2.5·max(cos, 0)).

Backbone: a pretrained open_clip model when its weights exist locally (``pretrained_model`` +
``pretrained_weights``, a checkpoint file; nothing is downloaded); otherwise the domain CLIP
trained by the ``train_clip`` stage (``models/clip``), named ``domainclip``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from budgetdiff.domain.evaluators import DOMAIN_CLIP_DIR, load_domain_clip

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipBackbone:
    """A CLIP model with its tokenizer, input size and normalisation, and its metric-name tag."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings of (N, 3, H, W) images in [0, 1] (resized bilinearly)."""
        x = images.float().to(self.device)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return self.model.encode_image((x - mean) / std, normalize=True).float()

    @torch.no_grad()
    def encode_texts(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings; raises ValueError on an empty prompt."""
        for p in prompts:
            if not p or not p.strip():
                raise ValueError("prompt: empty text has no CLIP-T score")
        return self.model.encode_text(self.tokenizer(list(prompts)).to(self.device), normalize=True).float()


def _backbone_tag(model_name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", model_name.lower())


def load_clip_backbone(domain_clip_dir: str | os.PathLike = DOMAIN_CLIP_DIR, pretrained_model: str | None = None,
                       pretrained_weights: str | os.PathLike | None = None, device: str = "cpu") -> ClipBackbone:
    """The CLIP backbone for the high-level and distributional metrics.

    Args:
        domain_clip_dir: the domain CLIP directory (default models/clip, from ``train_clip``).
        pretrained_model: an open_clip architecture name (e.g. "ViT-B-32"); used only together
            with ``pretrained_weights`` pointing at an existing local checkpoint file.
        pretrained_weights: local open_clip checkpoint (.safetensors / .bin / .pt).
        device: torch device.

    Raises:
        EvaluatorModelError: the domain CLIP is needed and its directory is missing.
    """
    if pretrained_model and pretrained_weights and Path(pretrained_weights).is_file():
        import open_clip

        model = open_clip.create_model(pretrained_model, pretrained=str(pretrained_weights), device=device).eval()
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        size = size[0] if isinstance(size, (tuple, list)) else size
        return ClipBackbone(model, open_clip.get_tokenizer(pretrained_model), _backbone_tag(pretrained_model),
                            int(size), tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD)))
    model, tokenizer = load_domain_clip(domain_clip_dir, device=device)
    return domain_clip_backbone(model, tokenizer)


def domain_clip_backbone(model, tokenizer) -> ClipBackbone:
    """Wrap a domain CLIP (loaded, or freshly built in tests) as a ``ClipBackbone``."""
    from budgetdiff.domain.evaluators import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD

    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ClipBackbone(model.eval(), tokenizer, "domainclip", int(size), CLIP_IMAGE_MEAN, CLIP_IMAGE_STD)


def iclip(backbone: ClipBackbone, images: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """``high/iclip_<backbone>``: cos(E_img(image), E_img(ref)) per image; (N,)."""
    from budgetdiff.metrics.pixel import check_pair

    check_pair(images, refs)
    return (backbone.encode_images(images) * backbone.encode_images(refs)).sum(-1).clamp(-1, 1).cpu()


def clipt(backbone: ClipBackbone, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``high/clipt_<backbone>``: cos(E_img(image), E_txt(prompt)) per image; (N,)."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    return (backbone.encode_images(images) * backbone.encode_texts(prompts)).sum(-1).cpu()
