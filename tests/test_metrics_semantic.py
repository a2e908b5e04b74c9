"""I-CLIP and CLIP-T on a tiny random domain CLIP; save/load; the loader's error."""

import pytest
import torch

from budgetdiff.domain.evaluators import EvaluatorModelError, save_domain_clip, domain_clip_model_cfg
from budgetdiff.metrics.semantic import clipt, iclip, load_clip_backbone
from test_metrics_helpers import (
    BLUR_LEVELS, NOISE_LEVELS, TINY_CLIP_CFG, add_noise, blur, rendered_batch, strictly_decreasing, tiny_backbone,
    tiny_clip,
)

_, IMAGES, PROMPTS = rendered_batch(16)


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone()


def test_iclip_identity_and_monotone_worsening(backbone):
    assert torch.allclose(iclip(backbone, IMAGES, IMAGES), torch.ones(16), atol=1e-5)
    noisy = [iclip(backbone, add_noise(IMAGES, s), IMAGES).mean().item() for s in NOISE_LEVELS]
    blurred = [iclip(backbone, blur(IMAGES, s), IMAGES).mean().item() for s in BLUR_LEVELS]
    assert strictly_decreasing(noisy), noisy
    assert strictly_decreasing(blurred), blurred


def test_clipt_is_a_cosine_and_rejects_empty_prompts(backbone):
    values = clipt(backbone, IMAGES, PROMPTS)
    assert values.shape == (16,) and torch.all(values.abs() <= 1 + 1e-6)
    image_emb = backbone.encode_images(IMAGES[:1])
    text_emb = backbone.encode_texts(PROMPTS[:1])
    assert values[0].item() == pytest.approx((image_emb @ text_emb.T).item(), abs=1e-5)
    with pytest.raises(ValueError, match="empty"):
        clipt(backbone, IMAGES[:2], [PROMPTS[0], "  "])


def test_save_load_round_trip(tmp_path, backbone):
    model, _ = tiny_clip()
    save_domain_clip(model, domain_clip_model_cfg(TINY_CLIP_CFG), tmp_path / "clip")
    loaded = load_clip_backbone(tmp_path / "clip")
    assert loaded.name == "domainclip"
    assert torch.allclose(loaded.encode_images(IMAGES), backbone.encode_images(IMAGES), atol=1e-5)
    assert torch.allclose(loaded.encode_texts(PROMPTS), backbone.encode_texts(PROMPTS), atol=1e-5)


def test_missing_directory_names_the_stage(tmp_path):
    with pytest.raises(EvaluatorModelError, match=r"does not exist.*dvc repro train_clip"):
        load_clip_backbone(tmp_path / "nothing")


@pytest.mark.slow
def test_trained_clip_t_worsens_under_noise_and_blur(tmp_path, monkeypatch):
    """~1 minute: train a small domain CLIP for 150 steps; CLIP-T of matching prompts then falls
    as the images are degraded."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from mlops.params import config_from_dict
    from training.clip import TrainClipConfig, train

    cfg = {"seed": 0, "resolution": 32, "embed_dim": 64,
           "vision": {"width": 96, "layers": 3, "patch_size": 8, "head_width": 32},
           "text": {"width": 64, "layers": 2, "heads": 2, "context_length": 48},
           "count_weights": [0.25] * 4, "noise_aug": 0.05, "batch_size": 128, "max_steps": 150, "lr": 1e-3,
           "weight_decay": 0.05, "warmup_fraction": 0.05, "grad_clip": 1.0, "val_every": 0, "eval_scenes": 100,
           "output_dir": str(tmp_path / "clip"), "metrics_path": str(tmp_path / "m.json")}
    assert train(config_from_dict(TrainClipConfig, cfg))["held_out/image_to_text_top1"] > 0.2
    trained = load_clip_backbone(tmp_path / "clip")
    _, images, prompts = rendered_batch(64, offset=90_000)
    noisy = [clipt(trained, add_noise(images, s), prompts).mean().item() for s in (0.0, 0.3, 0.6)]
    blurred = [clipt(trained, blur(images, s), prompts).mean().item() for s in (0.1, 1.5, 3.0)]
    assert strictly_decreasing(noisy), noisy
    assert strictly_decreasing(blurred), blurred
