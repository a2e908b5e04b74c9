"""The generation engine: requests in, images and per-image records out.

``Generator`` is the one entry point that runs budgetdiff's methods, alone or together. It is
loaded once per process from a model bundle (``budgetdiff.bundle``: base model, step-distilled
student, budget predictor, skip policy) and called with a list of ``GenerationRequest``\\ s::

    gen = Generator.load("models/bundle")
    results = gen([GenerationRequest("a small red circle at the top left", mode="auto", seed=3)])
    results[0].image, results[0].record

Modes (``MODES``):

- ``full``: the base model at ``steps`` (default: the bundle's, 50).
- ``budget``: BudgetFusion: the base model at the step count the budget predictor chooses for
  the prompt before generating (plateau rule at the bundle's ε, or the fewest steps whose
  predicted quality reaches ``quality_target`` on every level).
- ``adaptive``: AdaptiveDiffusion: the base model at ``steps`` with the shipped skip policy's
  operating point for the scheduler (the default point, or with ``quality_target`` the fastest
  point measured at or above it); ``skip`` overrides it.
- ``student``: the step-distilled student at its step count and the guidance it was judged at.
- ``auto``: the methods together, routed by the bundle's calibrated auto policy
  (``budgetdiff.auto_policy``, measured by ``calibrate_auto``): each candidate plan (the base
  model at a few steps, the student, BudgetFusion's per-prompt budget under a rule) was rendered on
  calibration prompts; without ``quality_target`` auto runs the cheapest plan that kept attr_acc
  and CLIP-T within tolerance of the full-step model, with ``quality_target`` q the cheapest plan
  whose conformal lower bound of realised quality reaches q (so q is met for the policy's coverage,
  95 %, of requests, not on average). A bundle without a policy falls back to the older rule:
  predicted budget S <= ``auto.student_max_steps`` -> the student at ``auto.student_guidance``,
  otherwise the base model at S steps with the skip policy's point for ``quality_target``.

Compatible requests (same model, steps, scheduler, guidance and skip configuration) run as one
batched pipeline call; every request keeps its own seed (one noise generator per image), so an
image does not depend on the batch it ran in. The engine keeps no state between calls: each
pipeline call builds its own scheduler and opens its own skip scope, and the UNet hooks are
installed once at load, so threads may share one ``Generator``.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .adaptive import AdaptiveSkipConfig
from .bundle import Bundle, BundleError, load_bundle
from .pipeline import MAX_STEPS, MIN_STEPS, SCHEDULERS, BudgetDiffusionPipeline
from .policy import PolicyError, SkipPolicy

MODES = ("full", "budget", "adaptive", "student", "auto")
OUTPUT_TYPES = ("pil", "np", "pt")
DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class GenerationRequest:
    """One image to generate.

    Args:
        prompt: the text prompt (non-empty).
        mode: one of ``MODES`` (default "auto").
        steps: denoising steps for ``full`` and ``adaptive`` (1..1000; default the bundle's 50).
            The other modes choose their own steps; giving steps to them is an error.
        quality_target: in (0, 1]: the least quality, as a fraction of the full-step image's,
            the request asks for (``budget``, ``adaptive``, ``auto``).
        scheduler: "ddim", "dpmpp" or "euler" (default: the bundle's). The student runs DDIM,
            the scheduler it was distilled with.
        guidance: classifier-free guidance scale (default: what the mode was measured at).
        seed: the image's noise seed.
        skip: an explicit ``AdaptiveSkipConfig`` instead of the shipped policy (``adaptive``).
        request_id: the caller's identifier, echoed in the record.
    """

    prompt: str
    mode: str = "auto"
    steps: int | None = None
    quality_target: float | None = None
    scheduler: str | None = None
    guidance: float | None = None
    seed: int = 0
    skip: AdaptiveSkipConfig | None = None
    request_id: str | None = None

    def validate(self) -> None:
        """Raise ValueError naming the field for anything the engine cannot serve."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("prompt: must be a non-empty string")
        if self.mode not in MODES:
            raise ValueError(f"mode: unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.steps is not None:
            if self.mode not in ("full", "adaptive"):
                raise ValueError(f"steps: mode {self.mode} chooses its own step count; give steps only with "
                                 "mode full or adaptive")
            if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not MIN_STEPS <= self.steps <= MAX_STEPS:
                raise ValueError(f"steps: must be an integer in {MIN_STEPS}..{MAX_STEPS}, got {self.steps!r}")
        if self.quality_target is not None:
            q = self.quality_target
            if isinstance(q, bool) or not isinstance(q, (int, float)) or not (math.isfinite(q) and 0 < q <= 1):
                raise ValueError(f"quality_target: must be a number in (0, 1], got {q!r}")
            if self.mode in ("full", "student"):
                raise ValueError(f"quality_target: mode {self.mode} has no quality control; use budget, "
                                 "adaptive or auto")
        if self.scheduler is not None and (not isinstance(self.scheduler, str)
                                           or self.scheduler.lower() not in SCHEDULERS):
            raise ValueError(f"scheduler: unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.guidance is not None:
            g = self.guidance
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
                raise ValueError(f"guidance: must be a finite number >= 0, got {g!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: must be an integer in 0..2**63-1, got {self.seed!r}")
        if self.skip is not None and self.mode != "adaptive":
            raise ValueError(f"skip: an explicit skip configuration applies to mode adaptive, not {self.mode}")


@dataclass
class GenerationResult:
    """One generated image (PIL, numpy (H, W, 3) in [0, 1] or torch (3, H, W) in [0, 1]) and its
    record: mode, model, policy (source and hash), steps, NFE, skip mask, UNet GFLOPs, seed,
    timings."""

    image: Any
    record: dict


@dataclass(frozen=True)
class Plan:
    """How one request runs: which model, steps, scheduler, guidance and skip configuration;
    requests with equal plans (``key``) share batched pipeline calls."""

    model: str  # "base" or "student"
    steps: int
    scheduler: str
    guidance: float
    skip: AdaptiveSkipConfig | None = None
    info: dict = field(default_factory=dict, compare=False)

    @property
    def key(self) -> tuple:
        return (self.model, self.steps, self.scheduler, self.guidance, self.skip)


@dataclass
class LoadedModel:
    """A pipeline with what records say about it."""

    name: str
    pipe: Any
    path: str | None
    unet_sha256: str | None

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "unet_sha256": self.unet_sha256}


class Generator:
    """The generation engine (module docstring). Build it with ``Generator.load(bundle_dir)``, or
    from loaded parts (tests, stock SD / SDXL pipelines) with the constructor.

    Args:
        base: the base pipeline (a ``BudgetDiffusionPipeline``).
        student: the step-distilled student pipeline, or None (modes student/auto then fail).
        student_steps: the student's step count.
        student_guidance: the guidance the student was judged at (``student`` mode).
        predictor: a ``BudgetPredictor`` for the base model, or None (budget/auto then fail).
        skip_policy: the ``SkipPolicy``, or None (adaptive mode then needs an explicit skip).
        plateau_epsilon: the budget rule's ε (default: the predictor's own).
        auto_student_max_steps, auto_student_guidance: the ``auto`` routing rule.
        base_steps: ``full`` / ``adaptive`` steps when a request gives none.
        base_scheduler, student_scheduler: the defaults.
        bundle: the ``Bundle`` it came from, for records.
        model_paths: {"base": path, "student": path} for records.
    """

    def __init__(self, base, student=None, *, student_steps: int = 8, student_guidance: float | None = None,
                 predictor=None, skip_policy: SkipPolicy | None = None, plateau_epsilon: float | None = None,
                 auto_student_max_steps: int | None = None, auto_student_guidance: float | None = None,
                 base_steps: int = 50, base_scheduler: str = "ddim", student_scheduler: str = "ddim",
                 bundle: Bundle | None = None, model_paths: dict | None = None):
        if not isinstance(base, BudgetDiffusionPipeline):
            raise TypeError("base: the engine runs BudgetDiffusionPipeline models")
        paths = model_paths or {}
        self.models = {"base": self._describe("base", base, paths.get("base"))}
        if student is not None:
            self.models["student"] = self._describe("student", student, paths.get("student"))
        self.student_steps = int(student_steps)
        self.student_guidance = student_guidance
        self.predictor = predictor
        self.skip_policy = skip_policy
        self.plateau_epsilon = plateau_epsilon
        self.auto_student_max_steps = auto_student_max_steps
        self.auto_student_guidance = auto_student_guidance
        self.base_steps = int(base_steps)
        self.base_scheduler = base_scheduler
        self.student_scheduler = student_scheduler
        self.bundle = bundle
        self.auto_policy = None  # budgetdiff.auto_policy.AutoPolicy: set by load() from the bundle
        self._encoder_lock = threading.Lock()
        # UNet GFLOPs of one evaluation per (model, CFG on): counted once here, since the flop
        # counter is not thread-safe; records multiply them by each image's evaluations.
        self.gflops_per_evaluation: dict[tuple[str, bool], float] = {}
        for name, model in self.models.items():
            model.pipe.set_progress_bar_config(disable=True)
            model.pipe.install_adaptive_skip()  # hooks once, before any concurrent call
            for cfg_on in (False, True):
                self.gflops_per_evaluation[(name, cfg_on)] = model.pipe.unet_gflops(2.0 if cfg_on else 1.0)

    @staticmethod
    def _describe(name: str, pipe, path: str | None) -> LoadedModel:
        sha = None
        if path is not None:
            from .fingerprint import FingerprintError, unet_fingerprint

            try:
                sha = unet_fingerprint(path)
            except FingerprintError:
                sha = None
        return LoadedModel(name, pipe, path, sha)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle_dir: str | Path = "models/bundle", device: str | torch.device | None = None,
             dtype: torch.dtype | None = None) -> "Generator":
        """Load the bundle's models (fp16 on CUDA, fp32 on CPU) and check that its budget
        predictor was trained for its base model. Raises ValueError (BundleError) naming the
        part that is missing or does not fit."""
        from .budget import BudgetModelError, load_budget_predictor
        from .generation import ModelDirectoryError, load_pipeline

        bundle = load_bundle(bundle_dir)
        try:
            base = load_pipeline(bundle.base, device, dtype)
            student = load_pipeline(bundle.student.path, device, dtype) if bundle.student else None
        except ModelDirectoryError as exc:
            raise BundleError(f"bundle: {exc}") from None
        if student is not None and _same_text_encoder(bundle.base, bundle.student.path):
            student.text_encoder = base.text_encoder  # one frozen encoder in memory, not two
        for name, pipe in (("base", base), ("student", student)):
            if pipe is not None and not isinstance(pipe, BudgetDiffusionPipeline):
                raise BundleError(f"bundle: the {name} model is a {type(pipe).__name__}; the engine serves "
                                  "BudgetDiffusionPipeline models (stock SD/SDXL: budgetdiff.generation)")
        predictor = None
        if bundle.budget is not None:
            try:
                predictor = load_budget_predictor(bundle.budget)
                predictor.check_model(bundle.base)
            except BudgetModelError as exc:
                raise BundleError(f"budget: {exc}") from None
        auto = bundle.auto
        gen = cls(base, student, student_steps=bundle.student.steps if bundle.student else 8,
                   student_guidance=bundle.student.guidance if bundle.student else None,
                   predictor=predictor, skip_policy=bundle.skip_policy, plateau_epsilon=bundle.plateau_epsilon,
                   auto_student_max_steps=auto.student_max_steps if auto else None,
                   auto_student_guidance=auto.student_guidance if auto else None,
                   base_steps=bundle.base_steps, base_scheduler=bundle.base_scheduler,
                   student_scheduler=bundle.student.scheduler if bundle.student else "ddim",
                   bundle=bundle, model_paths={"base": bundle.base,
                                               "student": bundle.student.path if bundle.student else None})
        gen.auto_policy = auto.policy if auto else None
        return gen

    # ------------------------------------------------------------------------------------------
    def check_request(self, request: GenerationRequest) -> None:
        """Raise ValueError naming the field when this generator cannot serve ``request``."""
        request.validate()
        mode = request.mode
        if mode in ("student", "auto") and "student" not in self.models:
            raise ValueError(f"mode: {mode} needs a student model, and this bundle has none")
        if mode in ("budget", "auto") and self.predictor is None:
            raise ValueError(f"mode: {mode} needs a budget predictor, and this bundle has none")
        if mode == "auto" and self.auto_student_max_steps is None and self.auto_policy is None:
            raise ValueError("mode: auto needs the bundle's auto rule, and this bundle has none")
        if mode == "adaptive" and request.skip is None and self.skip_policy is None:
            raise ValueError("mode: adaptive needs a skip policy, and this bundle has none")
        if mode == "adaptive" and request.skip is None:
            try:
                self.skip_policy.for_scheduler((request.scheduler or self.base_scheduler).lower())
            except PolicyError as exc:
                raise ValueError(str(exc)) from None
        if mode == "student" and request.scheduler is not None and request.scheduler.lower() != self.student_scheduler:
            raise ValueError(f"scheduler: the student was distilled for {self.student_scheduler}, "
                             f"not {request.scheduler}")

    def plan(self, requests: Sequence[GenerationRequest]) -> list[Plan]:
        """Each request's plan, after checking every request (the first bad one raises ValueError
        naming its field and, in a list of several, its position)."""
        for i, r in enumerate(requests):
            try:
                self.check_request(r)
            except ValueError as exc:
                raise ValueError(f"{exc} (request {i})" if len(requests) > 1 else str(exc)) from None
        routes = {i: self._auto_route(r) for i, r in enumerate(requests)
                  if r.mode == "auto" and self.auto_policy is not None}
        budgeted, overrides = [], []
        for i, r in enumerate(requests):
            if r.mode == "budget" or (r.mode == "auto" and i not in routes):
                budgeted.append(i)
                overrides.append(None)
            elif i in routes and routes[i][0] is not None and routes[i][0].kind == "budget":
                budgeted.append(i)
                overrides.append(routes[i][0])
        choices = self._choose_budgets([requests[i] for i in budgeted], overrides) if budgeted else []
        by_index = dict(zip(budgeted, choices))
        return [self._plan_auto(r, routes[i], by_index.get(i)) if i in routes else self._plan_one(r, by_index.get(i))
                for i, r in enumerate(requests)]

    def _auto_route(self, r: GenerationRequest):
        return self.auto_policy.choose(None if r.quality_target is None else float(r.quality_target))

    def _plan_auto(self, r: GenerationRequest, route: tuple, budget: dict | None) -> Plan:
        """An auto request under the calibrated auto policy."""
        cand, why = route
        base_guidance = float(self.models["base"].pipe.config.default_guidance_scale)
        scheduler = (r.scheduler or self.auto_policy.scheduler or self.base_scheduler).lower()
        info = {"auto": {"route": cand.name if cand else "reference", "why": why,
                         "policy": self.auto_policy.describe(),
                         "measured": ({k: cand.measured.get(k) for k in ("gflops_per_image", "quality_mean",
                                                                        "quality_lower_bound")} if cand else None)}}
        if cand is None:
            g = float(r.guidance) if r.guidance is not None else base_guidance
            return Plan("base", int(self.auto_policy.reference.get("steps") or self.base_steps), scheduler, g, info=info)
        if cand.model == "student":
            g = float(r.guidance) if r.guidance is not None else float(cand.guidance if cand.guidance is not None
                                                                        else self.student_guidance or base_guidance)
            return Plan("student", cand.steps or self.student_steps, self.student_scheduler, g, info=info)
        g = float(r.guidance) if r.guidance is not None else float(cand.guidance if cand.guidance is not None
                                                                    else base_guidance)
        if cand.kind == "uniform" and cand.skip:
            config, policy = self._skip_point(scheduler, None)
            return Plan("base", int(cand.steps), scheduler, g, config, info={**info, "skip_policy": policy})
        if cand.kind == "uniform":
            return Plan("base", int(cand.steps), scheduler, g, info=info)
        return Plan("base", int(budget["chosen_steps"]), scheduler, g, info={**info, "budget": budget})

    def _choose_budgets(self, requests: list[GenerationRequest], overrides: list | None = None) -> list[dict]:
        """BudgetFusion: each prompt's predicted curves and chosen step count, one batched
        prediction for all the prompts. ``overrides``: per request an auto candidate whose budget
        rule (quality q' or plateau ε) replaces the request's own."""
        from .budget import PlateauRule, QualityTargetRule, choose_steps, quality_fraction, text_encoder_of

        base = self.models["base"].pipe
        encoder, tokenizer, _ = text_encoder_of(base)
        start = time.perf_counter()
        with self._encoder_lock, torch.no_grad():
            curves = self.predictor.predict([r.prompt for r in requests], encoder, tokenizer)
        prediction_ms = (time.perf_counter() - start) * 1000 / len(requests)
        rules = self.predictor.config["rules"]
        out = []
        overrides = overrides or [None] * len(requests)
        for r, c, cand in zip(requests, curves, overrides):
            if cand is not None and cand.budget_quality is not None:
                rule = QualityTargetRule(float(cand.budget_quality), rules["psnr_cap_db"])
            elif cand is not None:
                rule = PlateauRule(float(cand.budget_epsilon))
            elif r.quality_target is not None:
                rule = QualityTargetRule(float(r.quality_target), rules["psnr_cap_db"])
            else:
                eps = self.plateau_epsilon if self.plateau_epsilon is not None else rules["plateau_epsilon"]
                rule = PlateauRule(float(eps))
            choice = choose_steps(c, rule)
            k = c.step_grid.index(choice.steps)
            predicted = {level: float(quality_fraction(m, c.values[m][k:k + 1], c.reference.get(m),
                                                       rules["psnr_cap_db"])[0])
                         for level, m in c.levels.items()}
            out.append({"budget_model": self.predictor.path, "chosen_steps": choice.steps, "rule": choice.rule,
                        "reached": choice.reached, "per_level": choice.per_level,
                        "predicted_quality": {k_: round(v, 5) for k_, v in predicted.items()},
                        "predicted_quality_min": round(min(predicted.values()), 5) if predicted else None,
                        "prediction_ms": round(prediction_ms, 3), "prompt_truncated": c.prompt_truncated,
                        "predicted_curves": c.to_record(), "notes": self._budget_notes(r, c, choice)})
        return out

    def _budget_notes(self, r: GenerationRequest, curves, choice) -> list[str]:
        """Why a predicted budget may not hold for this request."""
        notes = [choice.note] if choice.note else []
        if curves.prompt_truncated:
            notes.append(f"prompt longer than {self.predictor.config['max_text_length']} tokens: "
                         "the predictor read the truncated prompt")
        # The curves were learned at the dataset's scheduler and guidance; others may need other budgets.
        rendered = self.predictor.config.get("rendered_with") or {}
        if r.scheduler is not None and "scheduler" in rendered and r.scheduler.lower() != rendered["scheduler"]:
            notes.append(f"the budget model learned curves with scheduler {rendered['scheduler']}, not {r.scheduler}")
        if r.guidance is not None and "guidance" in rendered and float(r.guidance) != float(rendered["guidance"]):
            notes.append(f"the budget model learned curves at guidance {rendered['guidance']}, not {r.guidance}")
        return notes

    def _skip_point(self, scheduler: str, quality_target: float | None):
        point = self.skip_policy.for_scheduler(scheduler).point_for_quality(quality_target)
        return point.config, {"point": point.name, **self.skip_policy.describe()}

    def _plan_one(self, r: GenerationRequest, budget: dict | None) -> Plan:
        base_guidance = self.models["base"].pipe.config.default_guidance_scale
        scheduler = (r.scheduler or self.base_scheduler).lower()
        guidance = float(r.guidance) if r.guidance is not None else float(base_guidance)
        if r.mode == "full":
            return Plan("base", r.steps or self.base_steps, scheduler, guidance)
        if r.mode == "adaptive":
            if r.skip is not None:
                config, policy = r.skip, {"point": "explicit", "path": None, "sha256": None, "source": "request"}
            else:
                config, policy = self._skip_point(scheduler, r.quality_target)
            return Plan("base", r.steps or self.base_steps, scheduler, guidance, config, {"skip_policy": policy})
        if r.mode == "student":
            g = float(r.guidance) if r.guidance is not None else float(self.student_guidance or base_guidance)
            return Plan("student", self.student_steps, self.student_scheduler, g)
        steps = int(budget["chosen_steps"])
        if r.mode == "budget":
            return Plan("base", steps, scheduler, guidance, info={"budget": budget})
        # auto
        rule = {"student_max_steps": self.auto_student_max_steps, "student_guidance": self.auto_student_guidance}
        if steps <= self.auto_student_max_steps:
            g = float(r.guidance) if r.guidance is not None else float(self.auto_student_guidance)
            route = {"route": "student", "why": f"predicted budget {steps} <= {self.auto_student_max_steps}",
                     "rule": rule}
            return Plan("student", self.student_steps, self.student_scheduler, g,
                        info={"budget": budget, "auto": route})
        config, policy = self._skip_point(scheduler, r.quality_target)
        route = {"route": "base+skip", "why": f"predicted budget {steps} > {self.auto_student_max_steps}",
                 "rule": rule}
        return Plan("base", steps, scheduler, guidance, config,
                    info={"budget": budget, "auto": route, "skip_policy": policy})

    # ------------------------------------------------------------------------------------------
    def __call__(self, requests: GenerationRequest | Sequence[GenerationRequest], output_type: str = "pil",
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: bool | Callable[[int], None] = False
                 ) -> list[GenerationResult]:
        """Generate one image per request, in order.

        Args:
            requests: a request or a list of them.
            output_type: "pil", "np" (H, W, 3) or "pt" (3, H, W), values in [0, 1].
            batch_size: the most images per pipeline call (>= 1).
            progress: True for a tqdm bar over images, or a callable given each finished call's
                image count.
        """
        single = isinstance(requests, GenerationRequest)
        requests = [requests] if single else list(requests)
        if not requests:
            return []
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
        plans = self.plan(requests)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(plans):
            groups.setdefault(p.key, []).append(i)
        bar = None
        if progress is True:
            from tqdm import tqdm

            bar = tqdm(total=len(requests), desc="generate", unit="image", leave=False)
        results: list[GenerationResult | None] = [None] * len(requests)
        try:
            for key, indices in groups.items():
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start:start + batch_size]
                    self._run_chunk([requests[i] for i in chunk], [plans[i] for i in chunk], chunk,
                                    output_type, results)
                    if bar is not None:
                        bar.update(len(chunk))
                    elif callable(progress):
                        progress(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return results

    def _run_chunk(self, requests: list[GenerationRequest], plans: list[Plan], indices: list[int],
                   output_type: str, results: list) -> None:
        plan = plans[0]
        model = self.models[plan.model]
        out = model.pipe([r.prompt for r in requests], num_inference_steps=plan.steps, guidance_scale=plan.guidance,
                         scheduler=plan.scheduler, seed=[r.seed for r in requests], output_type=output_type,
                         progress=False, adaptive=plan.skip)
        for j, (r, p, i, rec) in enumerate(zip(requests, plans, indices, out.records)):
            mask = rec.get("skip_mask")
            record = {
                **rec,
                "mode": r.mode,
                "request_id": r.request_id,
                "quality_target": r.quality_target,
                "model": model.describe(),
                "skipped": int(sum(mask)) if mask else 0,
                "skip_mask": mask,
                "cfg": p.guidance != 1.0,
                "unet_sample_evals": rec["nfe"] * (2 if p.guidance != 1.0 else 1),
                "unet_gflops": round(rec["nfe"] * self.gflops_per_evaluation[(model.name, p.guidance != 1.0)], 4),
                "policy": {
                    "skip": ({**p.info.get("skip_policy", {}), "config": p.skip.to_record()} if p.skip else None),
                    "budget": ({"path": self.predictor.path, "rule": p.info["budget"]["rule"]}
                               if "budget" in p.info else None),
                    "auto": p.info.get("auto"),
                    "bundle": self.bundle.describe() if self.bundle else None,
                },
            }
            record.pop("adaptive", None)
            if "budget" in p.info:
                record["budget"] = p.info["budget"]
            image = out.images[j]
            results[i] = GenerationResult(image, record)


def _same_text_encoder(base: str, student: str) -> bool:
    """True when the student's distillation record says its text encoder is the teacher's."""
    import json

    record = Path(student) / "distillation.json"
    try:
        linked = json.loads(record.read_text()).get("linked_to_teacher") or []
    except (OSError, ValueError):
        return False
    return "text_encoder" in linked
