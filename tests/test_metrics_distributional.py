"""Fréchet distance in the domain-CLIP feature space: sanity on rendered and noise sets."""

import pytest
import torch

from budgetdiff.metrics.distributional import frechet_distance
from test_metrics_helpers import add_noise, rendered_batch, strictly_increasing, tiny_backbone

_, SET_A, _ = rendered_batch(96, offset=0)
_, SET_B, _ = rendered_batch(96, offset=5000)


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone()


def test_identical_sets_have_zero_distance(backbone):
    assert frechet_distance(backbone, SET_A, SET_A) == pytest.approx(0.0, abs=1e-4)


def test_rendered_vs_rendered_small_rendered_vs_noise_large(backbone):
    same_domain = frechet_distance(backbone, SET_A, SET_B, batch_size=32)
    noise = frechet_distance(backbone, SET_A, torch.rand_like(SET_B))
    assert noise > 10 * same_domain
    degraded = [frechet_distance(backbone, SET_A, add_noise(SET_B, s)) for s in (0.0, 0.1, 0.3)]
    assert strictly_increasing(degraded), degraded


def test_needs_two_images_per_set(backbone):
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(backbone, SET_A[:1], SET_B)
