"""Realised quality (budgetdiff.statistics.quality): one definition per image and aggregated, its NaN
handling, the conformal bound and the coverage test, and what each mode promises."""

import math

import numpy as np
import pytest

from budgetdiff.statistics.quality import (QUALITY_PROMISES, QualityError, conformal_lower_bound, coverage_held, mean_quality,
                                quality_promise, realised_quality, share_reaching, wilson_bounds)


def test_realised_quality_is_the_lowest_level_per_image():
    q = realised_quality({"pixel/ssim": [0.9, 0.5], "mid/lpips_alex": [0.05, 0.1], "high/iclip_x": [0.99, 0.99],
                          "pixel/psnr": [30, 20], "high/clipt_x": [0.1, 0.1], "domain/attr_acc": [0.0, 0.0]})
    assert q.tolist() == pytest.approx([0.9, 0.5])  # psnr, clipt and attr_acc are not quality levels


def test_one_image_and_level_means_give_a_float():
    q = realised_quality({"pixel/ssim": 0.97, "mid/lpips_alex_randinit": 0.01, "high/iclip_domainclip": 0.995})
    assert isinstance(q, float) and q == pytest.approx(0.97)


def test_a_level_that_is_not_finite_is_left_out_of_that_image_only():
    q = realised_quality({"pixel/ssim": [np.nan, 0.6], "mid/lpips_alex": [0.2, 0.1], "high/iclip_x": [0.95, np.inf]})
    assert q.tolist() == pytest.approx([0.8, 0.6])
    assert realised_quality({"pixel/ssim": 0.7, "high/iclip_x": None}) == pytest.approx(0.7)
    none = realised_quality({"pixel/ssim": [np.nan, 0.9]})
    assert math.isnan(none[0]) and none[1] == pytest.approx(0.9)
    with pytest.raises(QualityError):
        realised_quality({"pixel/psnr": 30.0})


def test_an_image_without_a_quality_misses_every_target():
    q = np.array([0.99, np.nan, 0.97, 0.5])
    assert mean_quality(q) == pytest.approx((0.99 + 0.97 + 0.5) / 3)
    assert share_reaching(q, 0.9) == 0.5
    values = np.concatenate([np.full(5, np.nan), np.arange(95.0)])
    assert conformal_lower_bound(values, 0.95) == -math.inf  # the NaNs are the five lowest, not the highest


def test_conformal_lower_bound_is_the_right_order_statistic():
    values = np.arange(1, 100)  # n = 99: k = floor(100 * 0.05) = 5 -> the 5th smallest
    assert conformal_lower_bound(values, 0.95) == 5
    assert conformal_lower_bound(values, 0.8) == 20
    assert conformal_lower_bound(np.arange(10), 0.95) == -math.inf  # too few values for 95 %


def test_conformal_bound_covers_new_draws():
    rng = np.random.default_rng(0)
    hits = []
    for _ in range(400):
        cal, new = rng.normal(size=60), rng.normal()
        hits.append(new >= conformal_lower_bound(cal, 0.9))
    assert np.mean(hits) >= 0.87  # >= 0.9 in expectation; binomial slack over 400 trials


def test_coverage_is_refused_only_when_the_data_refute_it():
    lower, upper = wilson_bounds(0.975, 200)
    assert lower == pytest.approx(0.9495382468694924)  # bench_auto's reported share_lower_95 at 195/200
    held = coverage_held(np.r_[np.ones(28), np.zeros(4)], 0.9, 0.95, z=1.96)
    assert held["share"] == 28 / 32 and held["held"] and held["upper"] == pytest.approx(0.9503, abs=1e-4)
    assert not coverage_held(np.r_[np.ones(25), np.zeros(7)], 0.9, 0.95, z=1.96)["held"]


def test_each_mode_names_its_promise():
    assert QUALITY_PROMISES == {"auto": "coverage", "adaptive": "mean", "budget": "predicted_fraction"}
    assert quality_promise("auto")["promise"] == "coverage" and "95 %" in quality_promise("auto")["means"]
    assert quality_promise("full") is None and quality_promise("student") is None
