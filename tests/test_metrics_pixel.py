"""Pixel-level metrics: identity values, monotone worsening under noise and blur, bad input."""

import pytest
import torch

from budgetdiff.metrics.pixel import PSNR_CAP_DB, lsnr, psnr, ssim
from test_metrics_helpers import BLUR_LEVELS, NOISE_LEVELS, add_noise, blur, rendered_batch, strictly_decreasing

_, IMAGES, _ = rendered_batch(16)


def test_identity_values():
    assert torch.all(psnr(IMAGES, IMAGES) == PSNR_CAP_DB)
    assert torch.allclose(ssim(IMAGES, IMAGES), torch.ones(16), atol=1e-3)


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_reference_metrics_worsen_with_noise_and_blur(metric):
    noisy = [metric(add_noise(IMAGES, s), IMAGES).mean().item() for s in NOISE_LEVELS]
    blurred = [metric(blur(IMAGES, s), IMAGES).mean().item() for s in BLUR_LEVELS]
    assert strictly_decreasing(noisy), noisy
    assert strictly_decreasing(blurred), blurred


def test_lsnr_falls_with_noise_and_blur_per_image():
    clean = lsnr(IMAGES)
    # Up to σ = 0.1: beyond it L-SNR sits at its pure-noise floor (below), flat up to estimation noise.
    noisy = torch.stack([lsnr(add_noise(IMAGES, s)) for s in (0.01, 0.03, 0.1)])
    blurred = torch.stack([lsnr(blur(IMAGES, s)) for s in BLUR_LEVELS])
    for series in (torch.cat([clean[None], noisy]), torch.cat([clean[None], blurred])):
        assert torch.all(series[1:] < series[:-1]), series  # every image, every step
    # Pure noise: Var(∇²n)/σ² = 20, i.e. about 13 dB.
    noise = torch.rand(8, 3, 64, 64) * 0.2 + 0.4
    assert lsnr(noise).mean().item() == pytest.approx(13.0, abs=1.5)


def test_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(IMAGES, IMAGES[..., :16, :16])
