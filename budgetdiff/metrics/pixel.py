"""Pixel-level metrics: PSNR and SSIM against a reference (torchmetrics), and L-SNR, a
no-reference Laplacian signal-to-noise sharpness measure (BudgetFusion's pixel level).

All functions take float image batches (N, 3, H, W) in [0, 1] and return one value per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

PSNR_CAP_DB = 100.0  # PSNR of identical images: the MSE is floored at 1e-10 (data range 1)
SSIM_REFINE_ABOVE = 0.98  # float32 SSIM above this is recomputed in float64 (see ssim)
LSNR_NOISE_FLOOR = (1.0 / 255.0) ** 2 / 12.0  # variance of 8-bit quantisation noise
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights
# 4-neighbour Laplacian; sum of squared taps 20, so white noise of variance σ² gives 20σ².
_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
# Immerkær (1996) noise-estimation mask: the difference of two Laplacians, blind to linear ramps
# and (mostly) to edges; sum of squared taps 36, so white noise of std σ gives std 6σ.
_IMMERKAER = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])


def check_pair(images: torch.Tensor, refs: torch.Tensor) -> None:
    """Raise ValueError unless ``images`` and ``refs`` are batches of the same shape."""
    if images.shape != refs.shape:
        raise ValueError(f"image batch {tuple(images.shape)} and reference batch {tuple(refs.shape)} differ in shape")


def psnr(images: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """``pixel/psnr``: 10·log10(1 / MSE) in dB per image (data range 1), capped at
    ``PSNR_CAP_DB`` (100 dB) so identical images give a finite value."""
    check_pair(images, refs)
    value = peak_signal_noise_ratio(images.float(), refs.float(), data_range=1.0, reduction="none", dim=(1, 2, 3))
    return value.nan_to_num(posinf=PSNR_CAP_DB).clamp(max=PSNR_CAP_DB)


def ssim(images: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """``pixel/ssim``: structural similarity (Wang et al. 2004) per image, 11x11 Gaussian window
    (σ = 1.5), data range 1; 1 for identical images. Images under 11 px use a smaller window."""
    check_pair(images, refs)
    side = min(images.shape[-2:])
    kernel = min(11, side - (1 - side % 2))  # odd and at most the image side
    sigma = 1.5 * kernel / 11
    # In float32 the windowed variances E[x²] − E[x]² lose digits on flat regions (identical
    # scene images score about 0.998); float64 is exact but 13x slower on CPU, so only the
    # near-identical pairs, where that error matters, are recomputed in float64.
    kwargs = {"data_range": 1.0, "reduction": "none", "kernel_size": kernel, "sigma": sigma}
    value = structural_similarity_index_measure(images.float(), refs.float(), **kwargs).float()
    close = value > SSIM_REFINE_ABOVE
    if close.any():
        value[close] = structural_similarity_index_measure(images[close].double(), refs[close].double(),
                                                           **kwargs).float()
    return value


def _luma(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def lsnr(images: torch.Tensor) -> torch.Tensor:
    """``pixel/lsnr``: Laplacian signal-to-noise ratio in dB, a no-reference sharpness measure.

        L-SNR = 10·log10( Var(∇²Y) / (σ̂_n² + ε) ),  σ̂_n = median|N ∗ Y| / (0.6745 · 6)

    Y is the BT.601 luma in [0, 1]; ∇² the 4-neighbour Laplacian, whose variance is the classic
    focus measure (Pech-Pacheco et al. 2000): it falls when the image blurs. σ̂_n is a robust
    noise estimate: Immerkær's (1996) mask N (blind to edges and ramps) with the median absolute
    deviation (0.6745 σ for Gaussian noise) in place of his mean, so object edges and textures
    do not count as noise; ε is the 8-bit quantisation-noise variance. Added noise raises the
    denominator much faster than the numerator, so L-SNR falls under both blur and noise.
    Convolutions are "valid" (no border padding). BudgetFusion names L-SNR without giving a
    formula; this is our definition.
    """
    y = _luma(images.float())
    lap = F.conv2d(y, _LAPLACIAN.to(y).view(1, 1, 3, 3)).flatten(1)
    noise_response = F.conv2d(y, _IMMERKAER.to(y).view(1, 1, 3, 3)).flatten(1)
    sigma_n = noise_response.abs().median(dim=1).values / (0.6745 * 6.0)
    signal = lap.var(dim=1)
    return 10.0 * torch.log10((signal + 1e-12) / (sigma_n**2 + LSNR_NOISE_FLOOR))
