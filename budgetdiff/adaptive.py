"""AdaptiveDiffusion: skip redundant noise predictions, per sample, in any UNet pipeline.

Ye et al., "Training-Free Adaptive Diffusion with Bounded Difference Approximation Strategy"
(arXiv 2410.09873, NeurIPS 2024). After each denoising step the latents x_k are kept; the next
step may reuse the previous noise prediction instead of evaluating the network when the
third-order latent difference is small relative to the first-order one:

    paper form (eq. 8):     ||Δ³x_k|| <= δ · ||Δx_k||,
                            Δx_k = x_k − x_(k−1),  Δ³x_k = x_k − 3x_(k−1) + 3x_(k−2) − x_(k−3)
    official code's form:   |d_k − 2·d_(k−1) + d_(k−2)| <= 2δ · d_(k−1),  d_k = mean|x_k − x_(k−1)|

The scheduler step still runs at every timestep, on the reused prediction. At most C_max skips
in a row; the first ``warmup`` steps always compute.

Unlike the official code, decisions are per sample (the network runs only on the sub-batch that
needs it: a batch of 8 with 3 skipping costs 5 sample evaluations), the state is created fresh
for every call (a call is recognised by its timesteps starting again), and C_max holds from the
first decision on.

The mechanism is a diffusers ``ModelHook`` on the UNet, fed with the latents by the pipeline's
step callback: ``BudgetDiffusionPipeline(..., adaptive=config)`` uses it internally, and
``apply_adaptive_skip(pipe, config)`` attaches it to a stock StableDiffusionPipeline or
StableDiffusionXLPipeline without copying their loops::

    handle = apply_adaptive_skip(pipe, AdaptiveSkipConfig(threshold=0.01, max_skip=4))
    image = pipe(prompt, callback_on_step_end=handle.callback).images[0]
    handle.skip_masks()   # per image: True where the step reused the previous prediction
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook

HOOK_NAME = "budgetdiff_adaptive_skip"
HISTORY = 4  # latents x_(k-3) .. x_k for the third-order difference
ESTIMATORS = ("paper", "official")


@dataclass(frozen=True)
class AdaptiveSkipConfig:
    """Configuration of adaptive noise-prediction skipping.

    Args:
        threshold: δ, the skip threshold (>= 0; 0 disables skipping). Default 0.01 (official).
        max_skip: C_max, the most consecutive skipped predictions per sample (>= 0). Default 4.
        warmup: steps that always compute at the start (>= 4: the estimator needs the latents
            after four steps). Default 4 (official).
        estimator: "paper" (vector norms, eq. 8) or "official" (the scalar form of the code).
    """

    threshold: float = 0.01
    max_skip: int = 4
    warmup: int = 4
    estimator: str = "paper"

    def __post_init__(self):
        if not isinstance(self.threshold, (int, float)) or not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"threshold: must be a finite number >= 0, got {self.threshold}")
        if not isinstance(self.max_skip, int) or self.max_skip < 0:
            raise ValueError(f"max_skip: must be an integer >= 0, got {self.max_skip}")
        if not isinstance(self.warmup, int) or self.warmup < HISTORY:
            raise ValueError(
                f"warmup: must be an integer >= {HISTORY} (the estimator needs the latents of {HISTORY} steps), "
                f"got {self.warmup}"
            )
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator: must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")

    @property
    def enabled(self) -> bool:
        return self.threshold > 0 and self.max_skip > 0


def skip_candidates(history: list[torch.Tensor], config: AdaptiveSkipConfig) -> torch.Tensor:
    """Per-sample estimator verdict (B,) from the last four latents ``history`` (oldest first)."""
    x3, x2, x1, x0 = (h.flatten(1).float() for h in history[-HISTORY:])  # x0 = x_k (newest)
    if config.estimator == "paper":
        first = (x0 - x1).norm(dim=1)
        third = (x0 - 3 * x1 + 3 * x2 - x3).norm(dim=1)
        return third <= config.threshold * first
    d0, d1, d2 = (x0 - x1).abs().mean(1), (x1 - x2).abs().mean(1), (x2 - x3).abs().mean(1)
    return (d0 - 2 * d1 + d2).abs() <= 2 * config.threshold * d1


class AdaptiveSkipState:
    """The state of one generation call: latent history, cached model output, skip record."""

    def __init__(self):
        self.history: list[torch.Tensor] = []
        self.cache: torch.Tensor | None = None
        self.consecutive: torch.Tensor | None = None
        self.skips: list[torch.Tensor] = []  # one (B,) bool tensor per step
        self.last_timestep: float | None = None

    @property
    def step(self) -> int:
        return len(self.skips)

    def decide(self, batch: int, config: AdaptiveSkipConfig, device) -> torch.Tensor:
        """Which samples skip this step's network evaluation, (B,) bool."""
        if self.consecutive is None or self.consecutive.shape[0] != batch:
            self.consecutive = torch.zeros(batch, dtype=torch.long, device=device)
        skip = torch.zeros(batch, dtype=torch.bool, device=device)
        if config.enabled and self.cache is not None and self.step >= config.warmup and len(self.history) >= HISTORY:
            skip = skip_candidates(self.history, config).to(device) & (self.consecutive < config.max_skip)
        self.consecutive = torch.where(skip, self.consecutive + 1, torch.zeros_like(self.consecutive))
        self.skips.append(skip.cpu())
        return skip

    def observe(self, latents: torch.Tensor) -> None:
        self.history = (self.history + [latents.detach()])[-HISTORY:]

    def skip_masks(self) -> list[list[bool]]:
        """Per sample: for each step, True where the prediction was reused."""
        if not self.skips:
            return []
        stacked = torch.stack(self.skips, dim=1)  # (B, steps)
        return [[bool(v) for v in row] for row in stacked]

    def nfe(self) -> list[int]:
        """Per sample: network evaluations it took (steps it was computed in)."""
        return [sum(1 for s in mask if not s) for mask in self.skip_masks()]


def _take_rows(value: Any, rows: torch.Tensor, total: int) -> Any:
    """``value`` restricted to ``rows`` when it is batched (first dim == total), recursively."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == total:
        return value[rows.to(value.device)]
    if isinstance(value, dict):
        return {k: _take_rows(v, rows, total) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_take_rows(v, rows, total) for v in value)
    return value


class AdaptiveSkipHook(ModelHook):
    """UNet hook: evaluates the network only for the samples that do not skip this step.

    ``copies`` says how many stacked copies of the batch the UNet input holds (2 under
    classifier-free guidance: unconditional rows then conditional rows); a callable is asked
    at every call.
    """

    _is_stateful = True

    def __init__(self, config: AdaptiveSkipConfig, copies: int | Callable[[], int] = 1):
        super().__init__()
        self.config = config
        self.copies = copies
        self.state = AdaptiveSkipState()
        self._warned = False

    def reset_state(self, module):
        self.state = AdaptiveSkipState()
        return module

    def new_forward(self, module, sample, timestep, *args, **kwargs):
        state = self.state
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if state.last_timestep is not None and t >= state.last_timestep:
            state = self.state = AdaptiveSkipState()  # timesteps start again: a new call
        state.last_timestep = t
        copies = self.copies() if callable(self.copies) else self.copies
        total = sample.shape[0]
        if total % copies:
            raise ValueError(f"UNet batch {total} is not {copies} stacked copies of the latents")
        batch = total // copies
        if state.step > self.config.warmup and not state.history and not self._warned:
            warnings.warn("adaptive skip saw no latents: pass callback_on_step_end=handle.callback", stacklevel=2)
            self._warned = True

        skip = state.decide(batch, self.config, sample.device)
        original = self.fn_ref.original_forward
        if not bool(skip.any()):
            output = original(sample, timestep, *args, **kwargs)
            state.cache = _output_tensor(output)
            return output
        keep = (~skip).nonzero().flatten()
        full = state.cache.clone()
        if keep.numel():
            rows = torch.cat([keep + c * batch for c in range(copies)])
            sub = original(
                sample[rows], _take_rows(timestep, rows, total),
                *_take_rows(args, rows, total), **_take_rows(kwargs, rows, total),
            )
            full[rows.to(full.device)] = _output_tensor(sub)
        state.cache = full
        return _wrap_like(full, kwargs)


def _output_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _wrap_like(tensor: torch.Tensor, kwargs: dict):
    if kwargs.get("return_dict", True) is False:
        return (tensor,)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=tensor)


class AdaptiveSkipHandle:
    """What ``apply_adaptive_skip`` returns: the step callback to pass, and the last call's record."""

    def __init__(self, unet: torch.nn.Module, hook: AdaptiveSkipHook):
        self.unet, self.hook = unet, hook

    def callback(self, pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        """``callback_on_step_end``: hands the new latents to the estimator."""
        self.hook.state.observe(callback_kwargs["latents"])
        return callback_kwargs

    def skip_masks(self) -> list[list[bool]]:
        return self.hook.state.skip_masks()

    def nfe(self) -> list[int]:
        return self.hook.state.nfe()

    def remove(self) -> None:
        HookRegistry.check_if_exists_or_initialize(self.unet).remove_hook(HOOK_NAME, recurse=False)


def attach_adaptive_skip(unet: torch.nn.Module, config: AdaptiveSkipConfig,
                         copies: int | Callable[[], int] = 1) -> AdaptiveSkipHandle:
    """Attach (or replace) the adaptive-skip hook on ``unet``."""
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    if registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
    hook = AdaptiveSkipHook(config, copies)
    registry.register_hook(hook, HOOK_NAME)
    return AdaptiveSkipHandle(unet, hook)


def apply_adaptive_skip(pipe, config: AdaptiveSkipConfig) -> AdaptiveSkipHandle:
    """Attach adaptive skipping to a stock diffusers SD / SDXL pipeline's UNet.

    Pass ``handle.callback`` as the pipeline's ``callback_on_step_end``; read the skip masks and
    NFE of the last call from the handle. ``handle.remove()`` restores the plain UNet.
    """
    return attach_adaptive_skip(pipe.unet, config, copies=lambda: 2 if pipe.do_classifier_free_guidance else 1)
