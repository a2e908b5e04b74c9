import numpy as np
import pytest
import torch

from budgetdiff.methods import adaptive as adaptive_module
from budgetdiff.methods.adaptive import (
    AdaptiveSkipConfig,
    AdaptiveSkipState,
    SkipPlan,
    apply_adaptive_skip,
    longest_skip_run,
    max_skips,
    Parametrization,
    attach_adaptive_skip,
    mse_loss,
    oracle_skip_path,
    skip_candidates,
)
from budgetdiff.generation.loading import generate, load_pipeline

PROMPTS = ["a small red circle at the top left on a white background",
           "two large blue squares at the left and in the right on a black background",
           "a large dotted green cross in the center, gray background"]
ALWAYS = AdaptiveSkipConfig(threshold=1e9, max_skip=2)  # skip whenever the cap allows


@pytest.mark.parametrize(
    "kwargs, name",
    [({"threshold": -0.1}, "threshold"), ({"threshold": float("nan")}, "threshold"),
     ({"max_skip": -1}, "max_skip"), ({"warmup": 3}, "warmup"), ({"estimator": "median"}, "estimator"),
     ({"reuse": "x0"}, "reuse")],
)
def test_invalid_config(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdaptiveSkipConfig(**kwargs)


def _history(trajectories):
    """Four latents (oldest first) from per-sample callables of the step index."""
    return [torch.stack([f(k) for f in trajectories]) for k in range(4)]


def test_estimators_skip_smooth_and_keep_rough_trajectories():
    torch.manual_seed(0)
    base, direction = torch.randn(3, 4, 4), torch.randn(3, 4, 4)
    scales = (1.0, 3.0, 0.5, 4.0)  # erratic step sizes
    rough = [torch.randn(3, 4, 4) * s for s in scales]
    history = _history([lambda k: base + k * direction, lambda k: rough[k]])  # linear: Δ³x = 0
    for estimator in ("paper", "official"):
        verdict = skip_candidates(history, AdaptiveSkipConfig(threshold=0.05, estimator=estimator))
        assert verdict.tolist() == [True, False], estimator


def test_official_scalar_form_is_blind_to_direction_changes():
    # Random steps of equal size: the vector third difference is large, but the scalar d_k
    # (mean |x_k - x_(k-1)|) barely changes, so the official form calls it redundant.
    torch.manual_seed(0)
    history = [torch.randn(1, 3, 16, 16) for _ in range(4)]
    paper = skip_candidates(history, AdaptiveSkipConfig(threshold=0.1, estimator="paper")).item()
    official = skip_candidates(history, AdaptiveSkipConfig(threshold=0.1, estimator="official")).item()
    assert (paper, official) == (False, True)


def test_cap_holds_from_the_first_decision():
    state = AdaptiveSkipState()
    history = [torch.zeros(2, 1) + k for k in range(4)]  # linear: always a candidate
    cfg = AdaptiveSkipConfig(threshold=1.0, max_skip=1, warmup=4)
    state.cache = torch.zeros(2, 1)
    for _ in range(12):
        state.history = history
        state.decide(2, cfg, "cpu")
    mask = state.skip_masks()[0]
    assert mask[:4] == [False] * 4
    assert mask[4:] == [True, False] * 4


def test_threshold_zero_equals_plain_pipeline_exactly(tiny_pipe):
    for scheduler in ("ddim", "dpmpp", "euler"):
        plain = tiny_pipe(PROMPTS, num_inference_steps=8, scheduler=scheduler, output_type="np")
        zero = tiny_pipe(PROMPTS, num_inference_steps=8, scheduler=scheduler, output_type="np",
                         adaptive=AdaptiveSkipConfig(threshold=0.0))
        assert np.array_equal(plain.images, zero.images), scheduler
        assert [r["nfe"] for r in zero.records] == [8, 8, 8]
        assert all(not any(r["skip_mask"]) for r in zero.records)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp", "euler"])
def test_skipping_reduces_nfe_and_respects_the_cap(tiny_pipe, scheduler):
    out = tiny_pipe(PROMPTS, num_inference_steps=12, scheduler=scheduler, output_type="np", adaptive=ALWAYS)
    for record in out.records:
        mask = record["skip_mask"]
        assert len(mask) == 12 and not any(mask[:4])
        assert record["nfe"] == 12 - sum(mask) < 12
        run = longest = 0
        for skipped in mask:
            run = run + 1 if skipped else 0
            longest = max(longest, run)
        assert longest <= ALWAYS.max_skip
    assert np.isfinite(out.images).all()
    plain = tiny_pipe(PROMPTS, num_inference_steps=12, scheduler=scheduler, output_type="np")
    assert not np.array_equal(plain.images, out.images)


def test_per_sample_decisions_run_only_the_needed_sub_batch(tiny_pipe, unet_batch_sizes, monkeypatch):
    # Sample 1 of 3 never skips; samples 0 and 2 skip whenever allowed.
    monkeypatch.setattr(adaptive_module, "skip_candidates",
                        lambda history, config: torch.tensor([True, False, True]))
    sizes = unet_batch_sizes
    out = tiny_pipe(PROMPTS, num_inference_steps=8, guidance_scale=2.0, adaptive=ALWAYS, progress=False)
    # warm-up: 4 full batches (3 samples x 2 CFG copies); then 1 sample x 2 copies or all 3.
    assert sizes[:4] == [6] * 4 and set(sizes[4:]) <= {2, 6} and 2 in sizes[4:]
    assert out.records[1]["nfe"] == 8 and not any(out.records[1]["skip_mask"])
    assert out.records[0]["nfe"] < 8 and out.records[0]["skip_mask"] == out.records[2]["skip_mask"]
    assert sum(sizes) // 2 == sum(r["nfe"] for r in out.records)  # sample evaluations = total NFE


def test_skipped_sample_matches_its_own_run(tiny_pipe, monkeypatch):
    # A sample's result must not depend on what the others in its batch decide.
    monkeypatch.setattr(adaptive_module, "skip_candidates",
                        lambda history, config: torch.ones(history[-1].shape[0], dtype=torch.bool))
    batch = tiny_pipe(PROMPTS[:2], num_inference_steps=8, seed=[3, 4], adaptive=ALWAYS, output_type="np")
    alone = tiny_pipe(PROMPTS[1], num_inference_steps=8, seed=4, adaptive=ALWAYS, output_type="np")
    np.testing.assert_allclose(batch.images[1], alone.images[0], atol=1e-5)


def test_state_is_fresh_for_every_call(tiny_pipe):
    a = tiny_pipe(PROMPTS, num_inference_steps=10, adaptive=ALWAYS, output_type="np")
    b = tiny_pipe(PROMPTS, num_inference_steps=10, adaptive=ALWAYS, output_type="np")
    assert np.array_equal(a.images, b.images)
    assert [r["skip_mask"] for r in a.records] == [r["skip_mask"] for r in b.records]
    # and the hook is gone afterwards: a plain call is unaffected
    plain1 = tiny_pipe(PROMPTS, num_inference_steps=10, output_type="np")
    assert [r["nfe"] for r in plain1.records] == [10, 10, 10]


@pytest.mark.parametrize("which", ["tiny_sd_dir", "tiny_sdxl_dir"])
def test_stock_pipelines(which, request):
    pipe = load_pipeline(request.getfixturevalue(which))
    for scheduler in ("ddim", "dpmpp", "euler"):
        plain, _ = generate(pipe, PROMPTS[:2], steps=8, guidance=5.0, scheduler=scheduler, progress=False)
        zero, zero_rec = generate(pipe, PROMPTS[:2], steps=8, guidance=5.0, scheduler=scheduler, progress=False,
                                  adaptive=AdaptiveSkipConfig(threshold=0.0))
        assert [list(i.getdata()) for i in plain] == [list(i.getdata()) for i in zero], scheduler
        assert [r["nfe"] for r in zero_rec] == [8, 8]
        skipped, rec = generate(pipe, PROMPTS[:2], steps=8, guidance=5.0, scheduler=scheduler, progress=False,
                                adaptive=ALWAYS)
        assert all(r["nfe"] < 8 and len(r["skip_mask"]) == 8 for r in rec), scheduler
    assert not hasattr(pipe.unet.forward, "__wrapped__") or pipe.unet._diffusers_hook.get_hook(
        adaptive_module.HOOK_NAME) is None


def test_apply_adaptive_skip_handle_across_calls(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    handle = apply_adaptive_skip(pipe, ALWAYS)
    masks = []
    for _ in range(2):
        pipe("a red circle", num_inference_steps=9, guidance_scale=5.0, callback_on_step_end=handle.callback,
             generator=torch.Generator().manual_seed(0))
        masks.append(handle.skip_masks())
    assert masks[0] == masks[1] and len(masks[0][0]) == 9 and any(masks[0][0])
    handle.remove()
    pipe("a red circle", num_inference_steps=3, guidance_scale=5.0)
    assert handle.skip_masks() == masks[1]  # the removed hook saw nothing more


# ------------------------------------------------------------------------------------------
# Fixed skip plans and the greedy oracle
# ------------------------------------------------------------------------------------------
@pytest.fixture()
def keep_scheduler(tiny_pipe):
    """A call with ``scheduler=`` swaps the session-wide tiny_pipe's scheduler; these tests put
    it back so the tests after them see tiny_pipe as they would without them."""
    saved = tiny_pipe.scheduler
    yield tiny_pipe
    tiny_pipe.scheduler = saved


def test_skip_plan_validation():
    with pytest.raises(ValueError, match="step 0"):
        SkipPlan([True, False, False])
    with pytest.raises(ValueError, match="same number"):
        SkipPlan([[False, True], [False]])
    with pytest.raises(ValueError, match="at least one"):
        SkipPlan([])
    assert SkipPlan([False, True, True]).mask == ((False, True, True),)
    assert SkipPlan(torch.tensor([[False, True], [False, False]])).mask == ((False, True), (False, False))


@pytest.mark.usefixtures("keep_scheduler")
def test_all_false_plan_equals_plain_run_exactly(tiny_pipe):
    for scheduler in ("ddim", "dpmpp", "euler"):
        plain = tiny_pipe(PROMPTS, num_inference_steps=6, scheduler=scheduler, output_type="np")
        planned = tiny_pipe(PROMPTS, num_inference_steps=6, scheduler=scheduler, output_type="np",
                            adaptive=SkipPlan([False] * 6))
        assert np.array_equal(plain.images, planned.images), scheduler
        assert [r["nfe"] for r in planned.records] == [6, 6, 6]


@pytest.mark.usefixtures("keep_scheduler")
def test_plan_rows_are_followed_per_sample(tiny_pipe, unet_batch_sizes):
    masks = [[False, True, False, True, True, False], [False] * 6, [False, False, True, False, False, True]]
    out = tiny_pipe(PROMPTS, num_inference_steps=6, guidance_scale=2.0, output_type="np", adaptive=SkipPlan(masks))
    assert [r["skip_mask"] for r in out.records] == masks
    assert [r["nfe"] for r in out.records] == [3, 6, 4]
    assert sum(unet_batch_sizes) // 2 == 13  # CFG pairs: only non-skipping samples evaluate
    # a sample's image depends only on its own plan row
    alone = tiny_pipe(PROMPTS[2], num_inference_steps=6, seed=2, output_type="np", adaptive=SkipPlan(masks[2]))
    np.testing.assert_allclose(out.images[2], alone.images[0], atol=1e-5)
    with pytest.raises(ValueError, match="plan"):
        tiny_pipe(PROMPTS, num_inference_steps=7, adaptive=SkipPlan(masks))


def test_max_skips_and_longest_run():
    assert longest_skip_run([False, True, True, False, True]) == 2
    assert max_skips(10, 4, 4) == 5 and max_skips(10, 4, 1) == 3 and max_skips(4, 4, 4) == 0


@pytest.mark.usefixtures("keep_scheduler")
def test_oracle_reaches_the_budget_within_the_constraints(tiny_pipe):
    result = oracle_skip_path(tiny_pipe, PROMPTS[0], seed=1, steps=10, nfe_budget=6, scheduler="euler",
                              warmup=3, max_skip=2)
    assert result.reached_budget and result.nfe == 6 and sum(result.mask) == 4 and len(result.mask) == 10
    assert not any(result.mask[:3]) and longest_skip_run(result.mask) <= 2
    assert sorted(result.order) == [k for k, s in enumerate(result.mask) if s]
    assert len(result.losses) == 4 and result.candidates[0] == 7
    # the reported image and loss are the path's own
    replay = tiny_pipe(PROMPTS[0], num_inference_steps=10, scheduler="euler", seed=1, output_type="pt",
                       adaptive=SkipPlan(result.mask)).images
    assert mse_loss(replay, result.reference).item() == pytest.approx(result.losses[-1], rel=1e-3, abs=1e-9)
    with pytest.raises(ValueError, match="nfe_budget"):
        oracle_skip_path(tiny_pipe, PROMPTS[0], seed=1, steps=10, nfe_budget=4, warmup=3, max_skip=2)


@pytest.mark.usefixtures("keep_scheduler")
def test_oracle_first_pick_is_the_best_single_skip(tiny_pipe):
    steps, warmup = 8, 4
    result = oracle_skip_path(tiny_pipe, PROMPTS[1], seed=5, steps=steps, nfe_budget=steps - 1, warmup=warmup,
                              scheduler="ddim")
    reference = tiny_pipe(PROMPTS[1], num_inference_steps=steps, scheduler="ddim", seed=5, output_type="pt").images
    brute = {}
    for k in range(warmup, steps):  # brute force: each single skip in its own call
        mask = [i == k for i in range(steps)]
        image = tiny_pipe(PROMPTS[1], num_inference_steps=steps, scheduler="ddim", seed=5, output_type="pt",
                          adaptive=SkipPlan(mask)).images
        brute[k] = mse_loss(image, reference).item()
    best = min(brute, key=brute.get)
    assert result.order == [best] and result.mask == [i == best for i in range(steps)]
    assert result.losses[0] == pytest.approx(brute[best], rel=1e-3, abs=1e-9)


# ------------------------------------------------------------------------------------------
# What a skipped step reuses: the raw output, ε̂ or x̂0
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_parametrization_agrees_with_the_scheduler_and_round_trips(prediction_type):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type, clip_sample=False)
    sched.set_timesteps(10)
    par = Parametrization(sched.alphas_cumprod, prediction_type)
    torch.manual_seed(0)
    z, out = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = sched.timesteps[3]
    x0 = sched.step(out, t, z).pred_original_sample  # diffusers' own conversion
    torch.testing.assert_close(par.to_space(out, z, t, "sample"), x0, rtol=1e-4, atol=1e-4)
    a = sched.alphas_cumprod[int(t)]
    torch.testing.assert_close(par.to_space(out, z, t, "epsilon"), (z - a.sqrt() * x0) / (1 - a).sqrt(),
                               rtol=1e-4, atol=1e-4)
    for space in ("output", "epsilon", "sample"):
        torch.testing.assert_close(par.from_space(par.to_space(out, z, t, space), z, t, space), out,
                                   rtol=1e-4, atol=1e-4)
    # extra input channels (our UNet's coordinates) are ignored: the latents come first
    wide = torch.cat([z, torch.randn(2, 2, 4, 4)], dim=1)
    torch.testing.assert_close(par.to_space(out, wide, t, "epsilon"), par.to_space(out, z, t, "epsilon"))


def test_epsilon_and_sample_reuse_are_one_step_for_euler(tiny_pipe):
    """Euler moves along a straight line towards x̂0, so after a computed step the reused ε̂
    and the reused x̂0 imply the same direction: the images agree; raw-output (v) reuse differs."""
    plan = [False] * 4 + [True, True, False] * 4
    images = {reuse: tiny_pipe(PROMPTS, num_inference_steps=len(plan), output_type="np", scheduler="euler",
                               guidance_scale=2.0, adaptive=SkipPlan(plan, reuse=reuse)).images
              for reuse in ("epsilon", "sample", "output")}
    np.testing.assert_allclose(images["epsilon"], images["sample"], atol=1e-4)
    assert not np.allclose(images["sample"], images["output"], atol=1e-3)


def test_the_parametrization_is_built_once_per_scheduler(tiny_sd_dir, monkeypatch):
    """The stock-pipeline hook asks for the scheduler in use at every UNet call; its
    parametrization is rebuilt only when the pipeline swaps schedulers, and never for raw reuse."""
    from diffusers import EulerDiscreteScheduler

    built = []
    original = adaptive_module.parametrization_of
    monkeypatch.setattr(adaptive_module, "parametrization_of", lambda s: built.append(s) or original(s))
    pipe = load_pipeline(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)

    def run(config):
        handle = apply_adaptive_skip(pipe, config)
        pipe("a red circle", num_inference_steps=9, guidance_scale=5.0, callback_on_step_end=handle.callback)
        handle.remove()

    run(AdaptiveSkipConfig(threshold=1e9, max_skip=2))
    assert len(built) == 1
    run(AdaptiveSkipConfig(threshold=1e9, max_skip=2, reuse="output"))
    assert len(built) == 1
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    run(AdaptiveSkipConfig(threshold=1e9, max_skip=2))
    assert len(built) == 2 and isinstance(built[-1], EulerDiscreteScheduler)


def test_reuse_needs_the_scheduler():
    with pytest.raises(ValueError, match="reuse='epsilon' needs the scheduler"):
        attach_adaptive_skip(torch.nn.Linear(1, 1), AdaptiveSkipConfig(reuse="epsilon"))


@pytest.mark.parametrize("reuse", ["epsilon", "sample"])
def test_reuse_spaces_in_our_pipeline(tiny_pipe, reuse):
    """δ = 0 is still the plain run bit for bit; skipping in another space gives other images
    (the tiny model predicts v, so ε̂ and x̂0 reuse differ from raw-output reuse)."""
    plain = tiny_pipe(PROMPTS, num_inference_steps=8, output_type="np")
    zero = tiny_pipe(PROMPTS, num_inference_steps=8, output_type="np",
                     adaptive=AdaptiveSkipConfig(threshold=0.0, reuse=reuse))
    assert np.array_equal(plain.images, zero.images)
    raw = tiny_pipe(PROMPTS, num_inference_steps=12, output_type="np",
                    adaptive=AdaptiveSkipConfig(threshold=1e9, max_skip=2, reuse="output"))
    other = tiny_pipe(PROMPTS, num_inference_steps=12, output_type="np",
                      adaptive=AdaptiveSkipConfig(threshold=1e9, max_skip=2, reuse=reuse))
    assert [r["skip_mask"] for r in raw.records] == [r["skip_mask"] for r in other.records]
    assert np.isfinite(other.images).all() and not np.allclose(raw.images, other.images)
    assert other.records[0]["adaptive"]["reuse"] == reuse


def test_epsilon_reuse_is_output_reuse_for_an_epsilon_model(tiny_sd_dir):
    """Stock SD predicts ε: reusing ε̂ is reusing its raw output, the official behaviour."""
    pipe = load_pipeline(tiny_sd_dir)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    a, _ = generate(pipe, PROMPTS[:2], steps=10, guidance=5.0, progress=False,
                    adaptive=AdaptiveSkipConfig(threshold=1e9, max_skip=2, reuse="output"))
    b, _ = generate(pipe, PROMPTS[:2], steps=10, guidance=5.0, progress=False, adaptive=ALWAYS)
    assert [list(i.getdata()) for i in a] == [list(i.getdata()) for i in b]
