"""The version-2 scene domain (random detail) and the exact DDIM analysis behind its pilot."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image, ImageFilter

from budgetdiff.domain.detail import (ddim_alpha_bars, detail_scores, expected_region_sd, sample_eigenvalues,
                               variance_kept, variance_kept_per_direction)
from budgetdiff.domain.scenes import (MATERIALS, STRENGTHS, PromptParseError, SceneSpec, object_masks, parse_prompt,
                               render_scene_array, sample_scene, spec_to_prompt, with_seed,
                               without_detail)


@pytest.fixture(scope="module")
def scheduler():
    # The embedded model's schedule (models/base/scheduler), built here so the test needs no model.
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                         clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")


# --- version 1 stays as it was ----------------------------------------------------------------
def test_version1_scenes_prompts_and_renders_are_unchanged():
    # sha256 over the first 40 seeds' specs, prompts and renders, computed with the version-1 code
    # (commit 2b46438) before the version-2 domain was added.
    h = hashlib.sha256()
    for seed in range(40):
        s = sample_scene(seed)
        h.update(repr(s.to_dict()).encode())
        h.update(spec_to_prompt(s).encode())
        h.update(render_scene_array(s).tobytes())
    assert h.hexdigest() == "f7a8237841953f4623461f541bf5b46684e4602957d992732019270af28ef670"


def test_version1_specs_have_no_detail():
    for seed in range(200):
        s = sample_scene(seed)
        assert not s.has_detail and s.detail_class == "plain" and "material" not in s.to_dict()


# --- version 2: sampling, prompts, rendering --------------------------------------------------
def test_version2_adds_detail_but_keeps_the_version1_scene():
    for seed in range(100):
        v1, v2 = sample_scene(seed), sample_scene(seed, material_prob=1.0, speckle_prob=1.0)
        assert v2.material in MATERIALS[1:] and v2.strength in STRENGTHS
        assert [(o.shape, o.color, o.position) for o in v1.objects] == [(o.shape, o.color, o.position)
                                                                      for o in v2.objects]
        assert all(o.texture == "speckled" for o, p in zip(v2.objects, v1.objects) if p.texture == "plain")


@pytest.mark.parametrize("seed", range(60))
def test_version2_prompt_round_trip(seed):
    spec = sample_scene(seed, material_prob=0.7, speckle_prob=0.4)
    assert parse_prompt(spec_to_prompt(spec)) == spec.canonical()
    assert SceneSpec.from_dict(spec.to_dict()) == spec


def test_detail_words_parse():
    spec = parse_prompt("a large speckled red circle at the top left on a heavily grainy white background")
    assert (spec.material, spec.strength, spec.background) == ("grainy", "heavily", "white")
    assert spec.objects[0].texture == "speckled"
    assert parse_prompt("a small blue square in the center, mottled beige background").material == "mottled"
    assert parse_prompt("a small blue square in the center on a gray background").material == "plain"
    with pytest.raises(PromptParseError):
        parse_prompt("a small blue square in the center on a heavily gray background")


def test_grain_is_random_per_render_and_has_the_named_strength():
    spec = sample_scene(3, n_objects=1, material="grainy", strength="heavily")
    a, b = render_scene_array(with_seed(spec, 1)), render_scene_array(with_seed(spec, 2))
    assert not np.array_equal(a, b)
    assert np.array_equal(a, render_scene_array(with_seed(spec, 1)))  # deterministic per seed
    plain = render_scene_array(with_seed(replace(spec, material="plain", strength=""), 1))
    background = object_masks(with_seed(spec, 1)).max(0) == 0
    luma = lambda x: (x.astype(np.float32) / 127.5 - 1.0) @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    sd = (luma(a) - luma(plain))[background].std()
    # heavily = 0.24 on [-1, 1], less what clipping at 0..255 removes on a light background
    assert 0.15 < sd < 0.26


def test_object_masks_match_the_render_mask():
    spec = sample_scene(11, n_objects=3)
    _, union = render_scene_array(spec, with_mask=True)
    np.testing.assert_allclose(object_masks(spec).max(0), union, atol=1e-6)


# --- the exact DDIM analysis ------------------------------------------------------------------
def test_variance_kept_matches_monte_carlo_ddim(scheduler):
    """The closed form against diffusers' own DDIM step with the exact v-prediction denoiser."""
    lam = 0.01
    for steps in (8, 20):
        scheduler.set_timesteps(steps)
        ab = scheduler.alphas_cumprod.double()
        start = ab[scheduler.timesteps[0]]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(100_000, generator=g, dtype=torch.float64) * (start * lam + 1 - start).sqrt()
        for t in scheduler.timesteps:
            a, s = ab[t].sqrt(), (1 - ab[t]).sqrt()
            x0 = lam * a / (a * a * lam + s * s) * x
            v = a * (x - a * x0) / s - s * x0
            x = scheduler.step(v, t, x).prev_sample
        assert float(x.var() / lam) == pytest.approx(variance_kept(np.array([lam]), scheduler, steps), rel=0.02)


def test_the_closed_case_of_the_issue(scheduler):
    # Detail of s.d. 0.1: 47 / 73 / 88 % of its s.d. kept at 8 / 20 / 50 steps (22 / 53 / 78 % of
    # its variance).
    sd = [np.sqrt(variance_kept(np.array([0.01]), scheduler, n)) for n in (8, 20, 50)]
    np.testing.assert_allclose(sd, [0.47, 0.73, 0.88], atol=0.01)


def test_more_steps_and_more_variance_keep_more(scheduler):
    path = {n: ddim_alpha_bars(scheduler, n) for n in (4, 8, 20, 50)}
    lam = np.array([1e-3, 1e-2, 1e-1, 1.0])
    kept = np.stack([variance_kept_per_direction(lam, path[n]) for n in (4, 8, 20, 50)])
    assert (np.diff(kept, axis=0) > 0).all()  # more steps keep more
    assert (np.diff(kept, axis=1) > 0).all()  # larger variance is kept better
    assert path[8][-1] == 1.0 and len(path[8]) == 9


def test_sample_eigenvalues_recover_a_known_covariance():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 3)) * np.array([3.0, 1.0, 0.1])
    np.testing.assert_allclose(sorted(sample_eigenvalues(x)), [0.01, 1.0, 9.0], rtol=0.08)


# --- the detail judge -------------------------------------------------------------------------
def test_detail_judge_separates_ground_truth_from_degraded_images():
    gt_scores, blurred, flat = [], [], []
    for i in range(12):
        spec = sample_scene(98_500_000 + i, material="grainy", strength=["faintly", "", "heavily"][i % 3],
                            speckle_prob=0.5)
        expected = expected_region_sd(spec)
        image = render_scene_array(with_seed(spec, 1000 + i))
        gt_scores.append(detail_scores(image, spec, expected)["detail/score"])
        soft = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.8)))
        blurred.append(detail_scores(soft, spec, expected)["detail/score"])
        flat.append(detail_scores(render_scene_array(without_detail(spec)), spec, expected)["detail/score"])
    assert np.mean(gt_scores) > 0.9
    assert np.mean(blurred) < np.mean(gt_scores) - 0.3
    assert np.mean(flat) < 0.5


def test_detail_judge_leaves_plain_prompts_unscored():
    # Striped and dotted objects are (structured) detail too; plain objects on a flat background are not.
    spec = parse_prompt("a large red circle at the top left and a large blue square at the bottom right "
                        "on a white background")
    scores = detail_scores(render_scene_array(spec), spec)
    assert np.isnan(scores["detail/score"]) and np.isnan(scores["detail/sd_ratio"])
