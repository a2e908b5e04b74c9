"""LPIPS: identity, monotone worsening, backend name and weights with and without ImageNet AlexNet."""

import pytest
import torch

import budgetdiff.metrics.perceptual as perceptual
from budgetdiff.metrics.perceptual import ALEXNET_IMAGENET_FILE, LPIPS_NAME, LPIPS_RANDINIT_NAME, LpipsMetric
from test_metrics_helpers import BLUR_LEVELS, NOISE_LEVELS, add_noise, blur, rendered_batch, strictly_increasing

_, IMAGES, _ = rendered_batch(8)


@pytest.fixture()
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("BUDGETDIFF_ALEXNET_WEIGHTS", raising=False)
    return tmp_path / "hub"


def test_randinit_backend_when_imagenet_weights_absent(empty_hub, monkeypatch):
    monkeypatch.setattr(perceptual, "_warned_randinit", False)
    with pytest.warns(UserWarning, match="randomly initialised"):
        metric = LpipsMetric()
    assert metric.name == LPIPS_RANDINIT_NAME
    # Deterministic trunk: a second instance gives the same distances.
    noisy = add_noise(IMAGES, 0.1)
    assert torch.allclose(metric(noisy, IMAGES), LpipsMetric()(noisy, IMAGES))


def test_imagenet_backend_uses_local_checkpoint(empty_hub):
    from torchvision.models import alexnet

    torch.manual_seed(123)
    state = alexnet(weights=None).state_dict()
    (empty_hub / "checkpoints").mkdir(parents=True)
    torch.save(state, empty_hub / "checkpoints" / ALEXNET_IMAGENET_FILE)
    metric = LpipsMetric()
    assert metric.name == LPIPS_NAME
    assert torch.equal(getattr(metric.lpips.net.slice1, "0").weight, state["features.0.weight"])
    assert torch.equal(getattr(metric.lpips.net.slice5, "10").bias, state["features.10.bias"])


def test_identity_and_monotone_worsening(empty_hub):
    metric = LpipsMetric()
    assert torch.all(metric(IMAGES, IMAGES) == 0)
    noisy = [metric(add_noise(IMAGES, s), IMAGES).mean().item() for s in NOISE_LEVELS]
    blurred = [metric(blur(IMAGES, s), IMAGES).mean().item() for s in BLUR_LEVELS]
    assert strictly_increasing(noisy), noisy
    assert strictly_increasing(blurred), blurred


def test_missing_explicit_weights_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        LpipsMetric(alexnet_weights=tmp_path / "missing.pth")
