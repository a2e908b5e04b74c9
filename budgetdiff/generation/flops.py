"""FLOPs of the denoising network: one counter (``torch.utils.flop_counter``) for every count.

``counting_unet_flops(unet)`` counts each UNet call: ``FlopCounterMode`` is entered in a forward
pre-hook and left in the forward hook, so the text encoder and the scheduler are not counted,
and a call whose predictions adaptive skipping reuses counts only what it computes.

Attention kernels: with ``attention="math"`` (the default) attention runs on the math SDPA
kernel, which the counter sees as its matrix products, so the count is the same on every device.
``attention="as_run"`` leaves torch's choice: CUDA's flash and memory-efficient kernels are
counted, but the fused CPU kernel is invisible to the counter, so on CPU the attention FLOPs are
missing (6.8 % of a guided evaluation of the embedded model). ``unet_gflops`` still counts
"as_run" because the GFLOPs stored by bench_distill, calibrate_auto and bench_auto were measured
that way (docs/status.md, "Known problems").
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

ATTENTION_MODES = ("math", "as_run")


@contextmanager
def counting_unet_flops(unet, attention: str = "math"):
    """Count the FLOPs of every call of ``unet`` inside the block; yields a list that receives
    one total per call, in call order."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention: must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    calls: list[int] = []
    modes: list[FlopCounterMode] = []

    def enter(module, args):
        modes.append(FlopCounterMode(display=False))
        modes[-1].__enter__()

    def leave(module, args, output):
        mode = modes.pop()
        mode.__exit__(None, None, None)
        calls.append(mode.get_total_flops())

    handles = [unet.register_forward_pre_hook(enter), unet.register_forward_hook(leave)]
    try:
        with sdpa_kernel(SDPBackend.MATH) if attention == "math" else nullcontext():
            yield calls
    finally:
        for h in handles:
            h.remove()
