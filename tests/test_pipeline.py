import numpy as np
import pytest
import torch

from budgetdiff.generation.pipeline import BudgetDiffusionPipeline, coordinate_channels

PROMPT = "a small red circle at the top left on a white background"


def test_output_shapes_and_records(tiny_pipe):
    out = tiny_pipe([PROMPT, "a large blue square in the center, black background"], num_inference_steps=3,
                    output_type="np")
    assert out.images.shape == (2, 16, 16, 3)
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0
    assert [r["steps"] for r in out.records] == [3, 3]
    assert [r["nfe"] for r in out.records] == [3, 3]  # one batched CFG call per step
    assert all(r["seconds"] > 0 for r in out.records)
    assert out.records[0]["guidance"] == 2.0  # the pipeline's default


def test_pil_output(tiny_pipe):
    out = tiny_pipe(PROMPT, num_inference_steps=2)
    assert out.images[0].size == (16, 16)


def test_same_seed_same_image_other_seed_other_image(tiny_pipe):
    a = tiny_pipe(PROMPT, num_inference_steps=3, seed=7, output_type="np").images
    b = tiny_pipe(PROMPT, num_inference_steps=3, seed=7, output_type="np").images
    c = tiny_pipe(PROMPT, num_inference_steps=3, seed=8, output_type="np").images
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_image_does_not_depend_on_its_batch(tiny_pipe):
    prompts = [PROMPT, "two small green crosses at the top and in the bottom on a gray background"]
    batch = tiny_pipe(prompts, num_inference_steps=3, seed=[11, 12], output_type="np").images
    alone = tiny_pipe(prompts[1], num_inference_steps=3, seed=12, output_type="np").images
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-5)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp", "euler"])
def test_each_scheduler(tiny_pipe, scheduler):
    out = tiny_pipe(PROMPT, num_inference_steps=4, scheduler=scheduler, output_type="pt")
    assert out.images.shape == (1, 3, 16, 16)
    assert torch.isfinite(out.images).all()
    assert out.records[0]["scheduler"] == scheduler


def test_guidance_changes_the_image(tiny_pipe):
    a = tiny_pipe(PROMPT, num_inference_steps=3, guidance_scale=1.0, output_type="np").images
    b = tiny_pipe(PROMPT, num_inference_steps=3, guidance_scale=4.0, output_type="np").images
    assert not np.allclose(a, b)


def test_unconditional_branch_skipped_at_guidance_one(tiny_pipe, unet_batch_sizes):
    sizes = unet_batch_sizes
    tiny_pipe([PROMPT] * 3, num_inference_steps=2, guidance_scale=1.0)
    assert sizes == [3, 3]
    sizes.clear()
    tiny_pipe([PROMPT] * 3, num_inference_steps=2, guidance_scale=3.0)
    assert sizes == [6, 6]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": [PROMPT, "  "]}, "prompt"),
        ({"prompt": PROMPT, "num_inference_steps": 0}, "steps"),
        ({"prompt": PROMPT, "num_inference_steps": 1001}, "steps"),
        ({"prompt": PROMPT, "guidance_scale": float("nan")}, "guidance"),
        ({"prompt": PROMPT, "guidance_scale": float("inf")}, "guidance"),
        ({"prompt": PROMPT, "scheduler": "heun"}, "scheduler"),
    ],
)
def test_bad_inputs(tiny_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe(**kwargs)


def test_long_prompt_is_truncated_and_says_so(tiny_pipe):
    long = " and ".join([PROMPT] * 20)
    out = tiny_pipe(long, num_inference_steps=1)
    assert out.records[0]["prompt_truncated"] is True


def test_coordinate_channels():
    c = coordinate_channels(2, 4, 4, "cpu", torch.float32)
    assert c.shape == (2, 2, 4, 4)
    assert c[0, 0, 0, 0] < 0 < c[0, 0, 0, -1]  # x grows to the right
    assert c[0, 1, 0, 0] < 0 < c[0, 1, -1, 0]  # y grows downwards


def test_save_and_load_with_stock_diffusers(tiny_pipe, tiny_model_dir):
    from diffusers import DiffusionPipeline

    assert (tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_model_dir / "text_encoder" / "model.safetensors").is_file()
    loaded = DiffusionPipeline.from_pretrained(tiny_model_dir)
    assert isinstance(loaded, BudgetDiffusionPipeline)
    assert loaded.config.default_guidance_scale == 2.0
    loaded.set_progress_bar_config(disable=True)
    a = tiny_pipe(PROMPT, num_inference_steps=3, output_type="np").images
    b = loaded(PROMPT, num_inference_steps=3, output_type="np").images
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("output_type", ["np", "pt", "pil"])
def test_generate_in_batches_equals_the_per_batch_loop_it_replaced(tiny_pipe, output_type):
    """The helper's images and records are those of the loop each benchmark used to write:
    ``pipe(prompts[i:i + B], seed=i)`` per batch (image i uses seed i)."""
    prompts = [PROMPT, "a large blue square in the center, black background", "two small green crosses",
               "a tiny yellow triangle at the bottom right", "three red circles on a gray background"]
    out = tiny_pipe.generate_in_batches(prompts, 2, seed=0, output_type=output_type, num_inference_steps=3)
    loop = [tiny_pipe(prompts[i:i + 2], num_inference_steps=3, seed=i, output_type=output_type, progress=False)
            for i in range(0, len(prompts), 2)]
    assert [r["seed"] for r in out.records] == [0, 1, 2, 3, 4]
    assert [r["prompt"] for r in out.records] == prompts
    if output_type == "np":
        assert np.array_equal(out.images, np.concatenate([o.images for o in loop]))
    elif output_type == "pt":
        assert torch.equal(out.images, torch.cat([o.images for o in loop]))
    else:
        assert [np.asarray(im).tolist() for im in out.images] == [np.asarray(im).tolist() for o in loop
                                                                  for im in o.images]


def test_generate_in_batches_takes_a_seed_per_prompt_and_checks_its_inputs(tiny_pipe):
    prompts = [PROMPT, "a large blue square in the center, black background", "two small green crosses"]
    out = tiny_pipe.generate_in_batches(prompts, 2, seed=[5, 9, 7], output_type="np", num_inference_steps=2)
    alone = tiny_pipe(prompts[1], num_inference_steps=2, seed=9, output_type="np").images
    assert [r["seed"] for r in out.records] == [5, 9, 7]
    np.testing.assert_allclose(out.images[1], alone[0], atol=1e-5)
    with pytest.raises(ValueError, match="seed: 2 seeds for 3 prompts"):
        tiny_pipe.generate_in_batches(prompts, 2, seed=[1, 2], num_inference_steps=2)
    with pytest.raises(ValueError, match="batch_size: must be >= 1"):
        tiny_pipe.generate_in_batches(prompts, 0, num_inference_steps=2)
