"""BudgetDiffusionPipeline: the embedded text-to-image model as a diffusers pipeline.

A pixel-space UNet2DConditionModel (v-prediction) conditioned on a frozen MiniLM encoder, both
through cross-attention on the token embeddings and through the pooled sentence embedding
added to the timestep embedding (``class_embed_type="projection"``). The UNet also sees two
coordinate channels (x, y in [-1, 1]) concatenated to its input, which makes "top left" easy to
place. Saved as a standard diffusers directory; once budgetdiff is imported (which registers
the class with diffusers, see the end of this file) ``DiffusionPipeline.from_pretrained(path)``
returns this class.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from budgetdiff.methods.adaptive import AdaptiveSkipConfig, SkipPlan, adaptive_skip_call, install_adaptive_skip
from budgetdiff.errors import RequestError
from budgetdiff.text import MAX_TEXT_LENGTH, encode_prompts

SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "dpmpp": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
}
MIN_STEPS, MAX_STEPS = 1, 1000


def check_steps(steps) -> None:
    """The rule for a step count (``GenerationRequest`` and the pipeline share it)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not MIN_STEPS <= steps <= MAX_STEPS:
        raise RequestError("steps", f"must be an integer in {MIN_STEPS}..{MAX_STEPS}, got {steps!r}")


def check_guidance(guidance) -> None:
    """The rule for a classifier-free guidance scale: a finite number >= 0."""
    if (isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance)
            or guidance < 0):
        raise RequestError("guidance", f"must be a finite number >= 0, got {guidance!r}")


def check_scheduler(name) -> None:
    """The rule for a scheduler name: one of ``SCHEDULERS`` (any case)."""
    if not isinstance(name, str) or name.lower() not in SCHEDULERS:
        raise RequestError("scheduler", f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def make_scheduler(name: str, config, **overrides) -> Any:
    """A diffusers scheduler by name ("ddim", "dpmpp", "euler") from another scheduler's config
    (noise schedule, prediction type), with ``overrides`` applied to the config."""
    check_scheduler(name)
    cls, extra = SCHEDULERS[name.lower()]
    return cls.from_config(config, **{**extra, **overrides})


def coordinate_channels(batch: int, height: int, width: int, device, dtype) -> torch.Tensor:
    """(batch, 2, H, W) tensor of x and y pixel-centre coordinates in [-1, 1]."""
    ys = torch.linspace(-1 + 1 / height, 1 - 1 / height, height, device=device, dtype=dtype)
    xs = torch.linspace(-1 + 1 / width, 1 - 1 / width, width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y])[None].expand(batch, -1, -1, -1)


@dataclass
class BudgetDiffusionOutput(BaseOutput):
    """Images (PIL list, numpy (B, H, W, 3) in [0, 1], or torch (B, 3, H, W) in [0, 1]) and
    one record per image: steps, nfe, seconds (the call's wall-clock divided by the batch),
    scheduler, guidance, seed."""

    images: Any
    records: list[dict] = field(default_factory=list)


class BudgetDiffusionPipeline(DiffusionPipeline):
    """Text-to-image pipeline of the embedded budgetdiff model.

    Args:
        unet: ``UNet2DConditionModel`` with ``in_channels = out_channels + 2`` (coordinates),
            v-prediction, ``class_embed_type="projection"`` over the pooled text embedding.
        text_encoder: frozen MiniLM ``BertModel``.
        tokenizer: its ``BertTokenizerFast``.
        scheduler: any diffusers scheduler: its config (noise schedule, prediction type) seeds the
            fresh scheduler each call builds by name (``scheduler=`` argument); the pipeline's own
            scheduler is never stepped or replaced, so one pipeline serves concurrent calls.
        default_guidance_scale: classifier-free guidance used when none is given, chosen by
            measurement when the model was trained.
        max_text_length: prompt tokens kept; longer prompts are truncated and say so in the record.
    """

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder,
        tokenizer,
        scheduler,
        default_guidance_scale: float = 1.5,
        max_text_length: int = MAX_TEXT_LENGTH,
    ):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(
            default_guidance_scale=float(default_guidance_scale), max_text_length=int(max_text_length)
        )

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def image_channels(self) -> int:
        return int(self.unet.config.out_channels)

    @torch.no_grad()
    def unet_gflops(self, guidance_scale: float | None = None) -> float:
        """GFLOPs of one denoising-network evaluation for one image at ``guidance_scale``
        (under classifier-free guidance both halves of the pair), counted by
        ``budgetdiff.generation.flops.counting_unet_flops`` on one UNet call with the attention kernel torch
        picks ("as_run": on CPU attention is not counted, see budgetdiff/generation/flops.py). Not
        thread-safe: call it before serving."""
        from budgetdiff.generation.flops import counting_unet_flops

        guidance_scale = self.config.default_guidance_scale if guidance_scale is None else guidance_scale
        batch = 2 if guidance_scale != 1.0 else 1
        hidden, mask, pooled, _ = self.encode_prompt(["a small red circle at the top left"], batch == 2, self.device)
        res, ch = self.resolution, self.image_channels
        x = torch.zeros(batch, ch, res, res, device=self.device, dtype=self.unet.dtype)
        coords = coordinate_channels(batch, res, res, x.device, x.dtype)
        with counting_unet_flops(self.unet, attention="as_run") as calls:
            self.unet(torch.cat([x, coords], 1), torch.tensor([500] * batch, device=self.device),
                      encoder_hidden_states=hidden, encoder_attention_mask=mask, class_labels=pooled)
        return calls[0] / 1e9

    def install_adaptive_skip(self) -> None:
        """Install the UNet's adaptive-skip hook now (calls with ``adaptive=`` install it on
        first use; a server installs it before taking concurrent calls)."""
        install_adaptive_skip(self.unet)

    # ------------------------------------------------------------------------------------------
    # Helpers
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def check_inputs(prompts: list[str], num_inference_steps: int, guidance_scale: float) -> None:
        """Raise ``RequestError`` naming the field for an empty prompt, steps outside 1..1000 or a
        guidance scale that is not a finite number >= 0 (the rules ``GenerationRequest`` applies)."""
        if not prompts:
            raise RequestError("prompt", "at least one prompt is needed")
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise RequestError("prompt", "must not be empty")
        check_steps(num_inference_steps)
        check_guidance(guidance_scale)

    def encode_prompt(self, prompts: list[str], do_cfg: bool, device):
        """Token embeddings, mask and pooled embeddings; unconditional (empty prompt) first."""
        texts = ([""] * len(prompts) + prompts) if do_cfg else prompts
        emb = encode_prompts(
            texts, self.text_encoder, self.tokenizer, max_length=self.config.max_text_length, device=device
        )
        dtype = self.unet.dtype
        truncated = emb.truncated[len(prompts):] if do_cfg else emb.truncated
        return emb.hidden.to(dtype), emb.mask, emb.pooled.to(dtype), truncated

    def prepare_latents(self, batch: int, generators: list[torch.Generator], device, dtype,
                        scheduler=None) -> torch.Tensor:
        """Initial noise, one generator per image so an image does not depend on its batch."""
        shape = (1, self.image_channels, self.resolution, self.resolution)
        latents = torch.cat([randn_tensor(shape, generator=g, device=device, dtype=dtype) for g in generators])
        return latents * (scheduler or self.scheduler).init_noise_sigma

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        pooled: torch.Tensor,
        guidance_scale: float,
        scheduler=None,
    ) -> torch.Tensor:
        """Guided model output for ``latents`` at timestep ``t`` (one batched network call);
        ``scheduler`` scales the input (default: the pipeline's).

        Classifier-free guidance: out = out(∅) + w·(out(c) − out(∅)) (Ho & Salimans 2022, eq. 6).
        """
        do_cfg = guidance_scale != 1.0
        model_in = torch.cat([latents] * 2) if do_cfg else latents
        model_in = (scheduler or self.scheduler).scale_model_input(model_in, t)
        coords = coordinate_channels(model_in.shape[0], *model_in.shape[-2:], model_in.device, model_in.dtype)
        out = self.unet(
            torch.cat([model_in, coords], dim=1),
            t,
            encoder_hidden_states=hidden,
            encoder_attention_mask=mask,
            class_labels=pooled,
        ).sample
        if do_cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out

    @staticmethod
    def to_output(images: torch.Tensor, output_type: str):
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "np":
            return array
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        seed: int | list[int] | None = 0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        progress: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        adaptive: AdaptiveSkipConfig | SkipPlan | None = None,
    ) -> BudgetDiffusionOutput:
        """Generate one image per prompt.

        Args:
            prompt: a prompt or a list of prompts (one image each).
            num_inference_steps: denoising steps (1..1000), default 50.
            guidance_scale: classifier-free guidance w; ``None`` uses the model's default. With
                w = 1 the unconditional branch is not evaluated.
            scheduler: "ddim", "dpmpp" or "euler"; ``None`` keeps the loaded scheduler.
            seed: an int (image i uses seed + i) or a list of ints, one per prompt.
            generator: explicit generators instead of ``seed``.
            output_type: "pil", "np" or "pt".
            progress: show a progress bar over the denoising steps.
            callback_on_step_end: ``f(pipe, step_index, t, {"latents": ...}) -> dict`` after each
                scheduler step; a returned "latents" replaces the current latents.
            adaptive: skip redundant noise predictions per sample (AdaptiveDiffusion, see
                ``budgetdiff.methods.adaptive``), or follow a fixed ``SkipPlan``; records then carry each
                image's skip mask, NFE and ``decision_seconds`` (the skip decisions' share of
                ``seconds``).
        """
        # 1. Check inputs
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        guidance_scale = self.config.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        self.check_inputs(prompts, num_inference_steps, guidance_scale)
        batch = len(prompts)
        device = self._execution_device
        start = time.perf_counter()

        # 2. Scheduler: a fresh one per call, never stored on the pipeline (multistep schedulers
        # keep state, and concurrent calls must not share it). Timesteps are "trailing" so every
        # step count starts at the last training timestep (Lin et al. 2023, "Common Diffusion
        # Noise Schedules and Sample Steps are Flawed", table 2).
        sched_name = (scheduler or scheduler_name(self.scheduler)).lower()
        sched = make_scheduler(sched_name, self.scheduler.config, timestep_spacing="trailing")
        sched.set_timesteps(num_inference_steps, device=device)
        timesteps = sched.timesteps

        # 3. Encode the prompts
        do_cfg = guidance_scale != 1.0
        hidden, mask, pooled, truncated = self.encode_prompt(prompts, do_cfg, device)

        # 4. Seeds and initial noise
        if generator is None:
            seed = 0 if seed is None else seed
            seeds = [seed + i for i in range(batch)] if isinstance(seed, int) else [int(s) for s in seed]
            if len(seeds) != batch:
                raise ValueError(f"seed: {len(seeds)} seeds for {batch} prompts")
            generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        else:
            generator = generator if isinstance(generator, list) else [generator] * batch
            seeds = [g.initial_seed() for g in generator]
        latents = self.prepare_latents(batch, generator, device, self.unet.dtype, sched)

        # 5. Adaptive skipping: the UNet's skip hook (installed once) with this call's own state
        skip_scope = (adaptive_skip_call(self.unet, adaptive, copies=2 if do_cfg else 1, scheduler=sched)
                      if adaptive else contextlib.nullcontext())

        # 6. Denoising loop
        with skip_scope as skipper:
            for i, t in enumerate(self.progress_bar(timesteps) if progress else timesteps):
                model_output = self.predict_noise(latents, t, hidden, mask, pooled, guidance_scale, sched)
                latents = sched.step(model_output, t, latents).prev_sample
                if callback_on_step_end is not None:
                    update = callback_on_step_end(self, i, t, {"latents": latents}) or {}
                    latents = update.get("latents", latents)
                if skipper is not None:
                    skipper.state.observe(latents)

        # 7. Post-process and records
        images = self.to_output(latents, output_type)
        seconds = (time.perf_counter() - start) / batch
        nfes = skipper.nfe() if skipper else [len(timesteps)] * batch
        masks = skipper.skip_masks() if skipper else [None] * batch
        records = [
            {
                "prompt": p,
                "steps": num_inference_steps,
                "nfe": n,
                "seconds": seconds,
                "scheduler": sched_name,
                "guidance": guidance_scale,
                "seed": s,
                "batch_size": batch,
                "prompt_truncated": tr,
            }
            for p, s, tr, n in zip(prompts, seeds, truncated, nfes)
        ]
        if skipper is not None:
            decision_seconds = skipper.state.decision_seconds / batch
            for record, m in zip(records, masks):
                record.update(skip_mask=m, adaptive=adaptive.to_record(), decision_seconds=decision_seconds)
        return BudgetDiffusionOutput(images=images, records=records)


    def generate_in_batches(self, prompts: list[str], batch_size: int, seed: int | list[int] = 0,
                            output_type: str = "pil", desc: str | None = None,
                            **call_kwargs) -> BudgetDiffusionOutput:
        """``self(prompts, **call_kwargs)`` in calls of at most ``batch_size`` prompts, with the
        seeds one call would use (image i uses ``seed + i``, or ``seed[i]``), so the images do
        not depend on how the prompts are batched. Images are gathered on the CPU: one array
        ("np"), one tensor ("pt") or one list ("pil"); records in prompt order. ``desc`` shows a
        progress bar over the batches."""
        from tqdm import tqdm

        prompts = list(prompts)
        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != len(prompts):
            raise ValueError(f"seed: {len(seeds)} seeds for {len(prompts)} prompts")
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        call_kwargs.setdefault("progress", False)
        starts = range(0, len(prompts), batch_size)
        images, records = [], []
        for i in tqdm(starts, desc=desc, leave=False, disable=desc is None):
            out = self(prompts[i:i + batch_size], seed=seeds[i:i + batch_size], output_type=output_type,
                       **call_kwargs)
            images.append(out.images.cpu() if output_type == "pt" else out.images)
            records += out.records
        if output_type == "pt":
            gathered = torch.cat(images) if images else torch.empty(0)
        elif output_type == "np":
            gathered = np.concatenate(images) if images else np.empty((0,))
        else:
            gathered = [im for batch in images for im in batch]
        return BudgetDiffusionOutput(images=gathered, records=records)


def scheduler_name(scheduler) -> str:
    """The short name of a scheduler instance ("ddim" for unknown kinds)."""
    for name, (cls, _) in SCHEDULERS.items():
        if isinstance(scheduler, cls):
            return name
    return "ddim"


# DiffusionPipeline.from_pretrained resolves model_index.json's "_class_name" as an attribute of
# the diffusers package; registering the class there lets stock diffusers code load our models.
import diffusers as _diffusers  # noqa: E402

if not hasattr(_diffusers, BudgetDiffusionPipeline.__name__):
    setattr(_diffusers, BudgetDiffusionPipeline.__name__, BudgetDiffusionPipeline)
