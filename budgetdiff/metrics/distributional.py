"""Distributional metric: Fréchet distance between two image sets in a CLIP image-feature
space, ``dist/fd_<backbone>`` (``dist/fd_domainclip`` with the domain CLIP).

    FD = ||μ_a − μ_b||² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2})      (Heusel et al. 2017, FID)

computed by torchmetrics' ``FrechetInceptionDistance`` with the CLIP image encoder (unit-norm
embeddings) as its custom feature extractor. Needs at least two images per set; the estimate is
biased upwards for small sets, so compare values computed on sets of equal size.
"""

from __future__ import annotations

import torch

from budgetdiff.metrics.semantic import ClipBackbone


class ClipImageFeatures(torch.nn.Module):
    """A ``torchmetrics`` feature extractor: images (N, 3, H, W) in [0, 1] -> unit-norm CLIP
    image embeddings (N, D)."""

    def __init__(self, backbone: ClipBackbone):
        super().__init__()
        self.backbone = backbone
        self.encoder = backbone.model  # registered so torchmetrics can move it between devices
        self.num_features = int(backbone.encode_images(torch.zeros(1, 3, 8, 8)).shape[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_images(images)


def frechet_distance(backbone: ClipBackbone, images_a: torch.Tensor, images_b: torch.Tensor,
                     batch_size: int = 256) -> float:
    """Fréchet distance between image sets ``images_a`` and ``images_b`` (each (N, 3, H, W) in
    [0, 1], N >= 2) in ``backbone``'s image-feature space."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if images_a.shape[0] < 2 or images_b.shape[0] < 2:
        raise ValueError("the Fréchet distance needs at least 2 images in each set")
    metric = FrechetInceptionDistance(feature=ClipImageFeatures(backbone), normalize=True)
    for images, real in ((images_a, True), (images_b, False)):
        for i in range(0, images.shape[0], batch_size):
            metric.update(images[i : i + batch_size].float(), real=real)
    return float(metric.compute().clamp(min=0.0))


def fd_name(backbone: ClipBackbone) -> str:
    return f"dist/fd_{backbone.name}"
