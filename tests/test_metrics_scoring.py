"""The batched scoring API (``MetricScorer``) on tiny random evaluators."""

import re

import numpy as np
import pytest
import torch

from budgetdiff.domain.evaluators import EvaluatorModelError
from budgetdiff.metrics import MetricScorer, ScoringConfig
from budgetdiff.metrics.perceptual import LpipsMetric
from budgetdiff.domain.scenes import BACKGROUNDS
from test_metrics_helpers import OracleChecker, add_noise, rendered_batch, tiny_backbone, tiny_checker

_, IMAGES, PROMPTS = rendered_batch(12)
ALL = {"pixel/lsnr", "pixel/psnr", "pixel/ssim", "mid/lpips_alex_randinit", "high/iclip_domainclip",
       "high/clipt_domainclip", "domain/attr_acc"}


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    hub = tmp_path_factory.mktemp("hub")
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))  # no ImageNet AlexNet here: the randinit backend
    try:
        lpips = LpipsMetric()
    finally:
        torch.hub.set_dir(previous)
    assert lpips.name == "mid/lpips_alex_randinit"
    return MetricScorer(ScoringConfig(batch_size=5), lpips=lpips, clip=tiny_backbone(), checker=tiny_checker())


def test_every_applicable_metric(scorer):
    assert set(scorer.score(IMAGES)) == {"pixel/lsnr"}
    values = scorer.score(add_noise(IMAGES, 0.1), refs=IMAGES, prompts=PROMPTS)
    assert set(values) == ALL
    assert all(v.shape == (12,) and np.isfinite(v).all() for v in values.values())
    assert set(scorer.score(IMAGES, prompts=PROMPTS)) == {"pixel/lsnr", "high/clipt_domainclip", "domain/attr_acc"}


def test_batching_and_input_forms_agree(scorer):
    noisy = add_noise(IMAGES, 0.1)
    batched = scorer.score(noisy, refs=IMAGES, prompts=PROMPTS)  # batches of 5, 5, 2
    whole = MetricScorer(ScoringConfig(batch_size=64), lpips=scorer.lpips, clip=scorer.clip,
                         checker=scorer.checker).score(noisy, refs=IMAGES, prompts=PROMPTS)
    as_uint8 = (IMAGES.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    from_arrays = scorer.score(list(as_uint8), refs=as_uint8)
    for name in batched:
        np.testing.assert_allclose(batched[name], whole[name], rtol=1e-4, atol=1e-5)
    assert np.all(from_arrays["pixel/psnr"] == 100.0)


def test_out_of_domain_prompt_gives_nan_attr_acc(scorer):
    prompts = PROMPTS[:2] + ["a photo of a cat"]
    values = scorer.score(IMAGES[:3], prompts=prompts)
    assert np.isfinite(values["domain/attr_acc"][:2]).all() and np.isnan(values["domain/attr_acc"][2])
    assert np.isfinite(values["high/clipt_domainclip"]).all()


def test_attr_acc_scores_what_partial_prompts_state():
    specs, images, prompts = rendered_batch(6, offset=40)
    wrong_background = [s.__class__(objects=s.objects, background="black" if s.background != "black" else "white")
                        for s in specs]
    scorer = MetricScorer(ScoringConfig(), clip=tiny_backbone(), checker=OracleChecker(wrong_background).eval())
    full = scorer.score(images, prompts=prompts)["domain/attr_acc"]
    assert (full < 1).all()  # the background is wrong in every image
    backgrounds = "|".join(BACKGROUNDS)
    partial = [re.sub(rf"(,? (on|against) an? |, |^an? )({backgrounds}) (background|backdrop)( with)?", "", p).strip()
               for p in prompts]
    assert not any(b in p for p in partial for b in BACKGROUNDS), partial
    values = scorer.score(images, prompts=partial[:-1] + ["a photo of a cat"])["domain/attr_acc"]
    assert np.all(values[:-1] == 1.0) and np.isnan(values[-1])  # the unstated background is not scored


def test_bad_input(scorer):
    with pytest.raises(ValueError, match="differs from reference size"):
        scorer.score(IMAGES[:2], refs=torch.nn.functional.interpolate(IMAGES[:2], size=64))
    resized = scorer.score(IMAGES[:2], refs=torch.nn.functional.interpolate(IMAGES[:2], size=64), resize=True)
    assert resized["pixel/psnr"].min() > 20
    with pytest.raises(ValueError, match="empty"):
        scorer.score(IMAGES[:2], prompts=["", PROMPTS[1]])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.score(IMAGES[:2], prompts=PROMPTS[:1])


def test_missing_models_raise_or_are_skipped(tmp_path):
    strict = MetricScorer(ScoringConfig(clip_dir=str(tmp_path / "clip"), attributes_dir=str(tmp_path / "attr")))
    with pytest.raises(EvaluatorModelError, match="train_clip"):
        strict.score(IMAGES[:2], prompts=PROMPTS[:2])
    lenient = MetricScorer(ScoringConfig(clip_dir=str(tmp_path / "clip"), attributes_dir=str(tmp_path / "attr"),
                                         skip_missing_models=True))
    with pytest.warns(UserWarning, match="left out"):
        values = lenient.score(IMAGES[:2], prompts=PROMPTS[:2])
    assert set(values) == {"pixel/lsnr"} and set(lenient.missing_models) == {"clip", "checker"}
