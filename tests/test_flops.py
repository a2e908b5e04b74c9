"""budgetdiff.generation.flops: the one FLOP counter, and how its two attention modes differ."""

import pytest
import torch

from budgetdiff.generation.flops import counting_unet_flops

PROMPT = "a small red circle at the top left on a white background"


def test_math_attention_counts_more_than_the_fused_cpu_kernel(tiny_pipe):
    with counting_unet_flops(tiny_pipe.unet) as math:
        tiny_pipe(PROMPT, num_inference_steps=2, guidance_scale=2.0, progress=False)
    with counting_unet_flops(tiny_pipe.unet, attention="as_run") as as_run:
        tiny_pipe(PROMPT, num_inference_steps=2, guidance_scale=2.0, progress=False)
    assert len(math) == len(as_run) == 2 and math[0] == math[1]
    if tiny_pipe.device.type == "cpu":  # the fused CPU attention kernel is invisible to the counter
        assert 0 < as_run[0] < math[0]
    # hooks are removed after the block: later calls are not counted
    tiny_pipe(PROMPT, num_inference_steps=1, progress=False)
    assert len(math) == 2


def test_unet_gflops_is_one_as_run_call_of_the_counter(tiny_pipe):
    with counting_unet_flops(tiny_pipe.unet, attention="as_run") as calls:
        with torch.no_grad():
            gflops = tiny_pipe.unet_gflops(2.0)
    assert calls == [pytest.approx(gflops * 1e9)]
    assert tiny_pipe.unet_gflops(1.0) == pytest.approx(gflops / 2)  # no unconditional half at w = 1


def test_unknown_attention_mode_is_named(tiny_pipe):
    with pytest.raises(ValueError, match="attention: must be one of math, as_run, got 'flash'"):
        with counting_unet_flops(tiny_pipe.unet, attention="flash"):
            pass
