"""The generation engine: requests in, images and per-image records out.

``Generator`` is the one entry point that runs budgetdiff's methods, alone or together. It is
loaded once per process from a model bundle (``budgetdiff.generation.bundle``: base model, step-distilled
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
  (``budgetdiff.methods.auto_policy``, measured by ``calibrate_auto``): each candidate plan (the base
  model at a few steps, the student, BudgetFusion's per-prompt budget under a rule) was rendered on
  calibration prompts; without ``quality_target`` auto runs the cheapest plan that kept attr_acc
  and CLIP-T within tolerance of the full-step model, with ``quality_target`` q the cheapest plan
  whose conformal lower bound of realised quality reaches q (so q is met for the policy's coverage,
  95 %, of requests, not on average). A bundle without a policy falls back to the older rule:
  predicted budget S <= ``auto.student_max_steps`` -> the student at ``auto.student_guidance``,
  otherwise the base model at S steps with the skip policy's point for ``quality_target``.

Requests of any plan share UNet calls through the step scheduler (``budgetdiff.generation.continuous``):
each image has its own sampler state and seed (one noise generator per image), so an image does
not depend on what it shared its calls with (up to floating-point reassociation, tested). The
engine keeps no state between calls: each call builds its own ``StepBatcher`` (a server keeps
one running, ``serving/model.py``), so threads may share one ``Generator``.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from budgetdiff.methods.adaptive import AdaptiveSkipConfig
from budgetdiff.generation.bundle import Bundle, BundleError, load_bundle
from budgetdiff.errors import RequestError
from budgetdiff.generation.pipeline import BudgetDiffusionPipeline, check_guidance, check_scheduler, check_steps
from budgetdiff.methods.policy import PolicyError, SkipPolicy

MODES = ("full", "budget", "adaptive", "student", "auto")
OUTPUT_TYPES = ("pil", "np", "pt")
DEFAULT_BATCH_SIZE = 16
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerationRequest:
    """One image to generate. Its fields are checked once, when it is made (``RequestError``
    naming the field); the engine then only checks what the loaded models can serve
    (``Generator.check_supported``). Field names are the API's (docs/engine.md, "One vocabulary").

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
        seed: the image's noise seed, 0..2**63-1.
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``RequestError`` naming the field for anything no engine could serve."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise RequestError("prompt", "must be a non-empty string")
        if self.mode not in MODES:
            raise RequestError("mode", f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.steps is not None:
            if self.mode not in ("full", "adaptive"):
                raise RequestError("steps", f"mode {self.mode} chooses its own step count; give steps only with "
                                            "mode full or adaptive")
            check_steps(self.steps)
        if self.quality_target is not None:
            q = self.quality_target
            if isinstance(q, bool) or not isinstance(q, (int, float)) or not (math.isfinite(q) and 0 < q <= 1):
                raise RequestError("quality_target", f"must be a number in (0, 1], got {q!r}")
            if self.mode in ("full", "student"):
                raise RequestError("quality_target", f"mode {self.mode} has no quality control; use budget, "
                                                     "adaptive or auto")
        if self.scheduler is not None:
            check_scheduler(self.scheduler)
        if self.guidance is not None:
            check_guidance(self.guidance)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise RequestError("seed", f"must be an integer in 0..2**63-1, got {self.seed!r}")
        if self.skip is not None and self.mode != "adaptive":
            raise RequestError("skip", f"an explicit skip configuration applies to mode adaptive, not {self.mode}")

    def for_image(self, index: int, request_id: str | None = None) -> "GenerationRequest":
        """Image ``index`` of an n-image call: this request at seed + ``index`` with its own
        ``request_id``. Only the seed moves, so the other fields are not checked again."""
        seed = self.seed + int(index)
        if not 0 <= seed <= MAX_SEED:
            raise RequestError("seed", f"seed + {index} is past 2**63-1")
        clone = copy.copy(self)  # no __init__: an already valid request is not validated twice
        object.__setattr__(clone, "seed", seed)
        object.__setattr__(clone, "request_id", request_id)
        return clone


@dataclass(frozen=True)
class BudgetChoice:
    """BudgetFusion's choice for one prompt: the predicted quality curves and the step count the
    rule picked from them."""

    budget_model: str | None
    chosen_steps: int
    rule: dict
    reached: bool
    per_level: dict
    predicted_quality: dict
    predicted_quality_min: float | None
    prediction_ms: float
    prompt_truncated: bool
    predicted_curves: dict
    notes: list[str]

    def to_dict(self) -> dict:
        return {"budget_model": self.budget_model, "chosen_steps": self.chosen_steps, "rule": self.rule,
                "reached": self.reached, "per_level": self.per_level, "predicted_quality": self.predicted_quality,
                "predicted_quality_min": self.predicted_quality_min, "prediction_ms": self.prediction_ms,
                "prompt_truncated": self.prompt_truncated, "predicted_curves": self.predicted_curves,
                "notes": list(self.notes)}


@dataclass(frozen=True)
class AutoRoute:
    """Where ``auto`` sent a request and why: under the calibrated auto policy (``policy``, the
    candidate's ``measured`` cost and quality) or the older student-threshold ``rule``.
    ``calibration`` is set when a part of the bundle was overridden (``Generator.from_bundle``):
    whether the calibrated policy still applies, and why (not)."""

    route: str
    why: str
    policy: dict | None = None
    measured: dict | None = None
    rule: dict | None = None
    calibration: dict | None = None

    def to_dict(self) -> dict:
        d = {"route": self.route, "why": self.why}
        if self.rule is not None:
            d["rule"] = self.rule
        else:
            d.update(policy=self.policy, measured=self.measured)
        if self.calibration is not None:
            d["calibration"] = self.calibration
        return d


@dataclass(frozen=True)
class Plan:
    """How one request runs: which model, steps, scheduler, guidance and skip configuration;
    requests with equal plans (``key``) share batched pipeline calls. ``skip_source`` names the
    skip-policy point (or "explicit"), ``budget`` the predictor's choice, ``route`` auto's route."""

    model: str  # "base" or "student"
    steps: int
    scheduler: str
    guidance: float
    skip: AdaptiveSkipConfig | None = None
    skip_source: dict | None = field(default=None, compare=False)
    budget: BudgetChoice | None = field(default=None, compare=False)
    route: AutoRoute | None = field(default=None, compare=False)

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


@dataclass(frozen=True)
class ImageRecord:
    """What one generated image is: the request it answers, what ran (model, steps, NFE, skip
    mask, scheduler, guidance), what it cost (UNet evaluations, GFLOPs, seconds) and the policies
    that decided it. Built in one place (``Generator``); ``to_dict`` is the JSON record (CLI,
    ``records.jsonl``, the registry pyfunc), ``summary`` the per-image record an API reply
    carries.

    Under the step scheduler (``budgetdiff.generation.continuous``): ``seconds`` is the image's share of the
    UNet calls it took part in (by rows) plus its own scheduler steps, ``batch_size`` the most
    images that shared one of its UNet calls, ``mean_call_images`` their mean, ``queue_seconds``
    the wait from submission to admission and ``latency_seconds`` submission to done."""

    prompt: str
    mode: str
    request_id: str | None
    quality_target: float | None
    model: LoadedModel
    steps: int
    nfe: int
    skip_mask: list[bool] | None
    scheduler: str
    guidance: float
    seed: int
    batch_size: int
    prompt_truncated: bool
    seconds: float
    unet_gflops: float
    decision_seconds: float | None = None
    skip_config: dict | None = None
    skip_source: dict | None = None
    budget: BudgetChoice | None = None
    route: AutoRoute | None = None
    bundle: dict | None = None
    queue_seconds: float | None = None
    latency_seconds: float | None = None
    mean_call_images: float | None = None

    @property
    def skipped(self) -> int:
        return int(sum(self.skip_mask)) if self.skip_mask else 0

    @property
    def cfg(self) -> bool:
        """Whether the unconditional branch ran (guidance != 1)."""
        return self.guidance != 1.0

    @property
    def unet_sample_evals(self) -> int:
        return self.nfe * (2 if self.cfg else 1)

    def _timing(self) -> dict:
        """How the step scheduler served it: queue wait, submit-to-done latency, images per call."""
        return {k: v for k, v in (("queue_seconds", self.queue_seconds), ("latency_seconds", self.latency_seconds),
                                  ("mean_call_images", self.mean_call_images)) if v is not None}

    def to_dict(self) -> dict:
        d = {"prompt": self.prompt, "steps": self.steps, "nfe": self.nfe, "seconds": self.seconds,
             "scheduler": self.scheduler, "guidance": self.guidance, "seed": self.seed,
             "batch_size": self.batch_size, "prompt_truncated": self.prompt_truncated}
        if self.decision_seconds is not None:
            d["decision_seconds"] = self.decision_seconds
        d.update(self._timing())
        d.update({
            "mode": self.mode, "request_id": self.request_id, "quality_target": self.quality_target,
            "model": self.model.describe(), "skipped": self.skipped, "skip_mask": self.skip_mask,
            "cfg": self.cfg, "unet_sample_evals": self.unet_sample_evals, "unet_gflops": self.unet_gflops,
            "policy": {
                "skip": {**(self.skip_source or {}), "config": self.skip_config} if self.skip_config else None,
                "budget": ({"path": self.budget.budget_model, "rule": self.budget.rule} if self.budget else None),
                "auto": self.route.to_dict() if self.route else None,
                "bundle": self.bundle,
            },
        })
        if self.budget is not None:
            d["budget"] = self.budget.to_dict()
        return d

    def summary(self) -> dict:
        """The per-image record of an API reply: what ran and what it cost, without the
        policies' full descriptions."""
        d = {"mode": self.mode, "steps": self.steps, "nfe": self.nfe, "skipped": self.skipped,
             "skip_mask": self.skip_mask, "scheduler": self.scheduler, "guidance": self.guidance,
             "seed": self.seed, "batch_size": self.batch_size, "quality_target": self.quality_target,
             "unet_sample_evals": self.unet_sample_evals, "unet_gflops": self.unet_gflops,
             "prompt_truncated": self.prompt_truncated, "request_id": self.request_id,
             "model": self.model.name, "generate_seconds": self.seconds, **self._timing()}
        if self.route is not None:
            d["route"] = self.route.route
            if self.route.calibration is not None:
                d["calibration"] = self.route.calibration
        if self.skip_source is not None and self.skip_config is not None:
            d["skip_point"] = self.skip_source.get("point")
        if self.budget is not None:
            d["budget"] = {"chosen_steps": self.budget.chosen_steps, "rule": self.budget.rule,
                           "predicted_quality_min": self.budget.predicted_quality_min}
        return d


@dataclass
class GenerationResult:
    """One generated image (PIL, numpy (H, W, 3) in [0, 1] or torch (3, H, W) in [0, 1]) and its
    ``ImageRecord``."""

    image: Any
    record: ImageRecord


class Generator:
    """The generation engine (module docstring). Build it with ``Generator.from_bundle(bundle_dir)``
    (``Generator.load`` is the same), or from loaded parts (tests, stock pipelines) with the
    constructor.

    Args:
        base: the base pipeline (a ``BudgetDiffusionPipeline``).
        student: the step-distilled student pipeline, or None (modes student/auto then fail).
        student_steps: the student's step count.
        student_guidance: the guidance the student was judged at (``student`` mode).
        predictor: a ``BudgetPredictor`` for the base model, or None (budget/auto then fail).
        skip_policy: the ``SkipPolicy``, or None (adaptive mode then needs an explicit skip).
        plateau_epsilon: the budget rule's ε (default: the predictor's own).
        auto_student_max_steps, auto_student_guidance: the older ``auto`` routing rule.
        auto_policy: the calibrated auto policy (``budgetdiff.methods.auto_policy.AutoPolicy``); when set,
            ``auto`` routes by it instead of the rule.
        base_steps: ``full`` / ``adaptive`` steps when a request gives none.
        base_scheduler, student_scheduler: the defaults.
        bundle: the ``Bundle`` it came from, for records.
        model_paths: {"base": path, "student": path} for records.
        calibration: what ``from_bundle`` found when a part was overridden: {"base": why} when the
            calibrated auto policy does not hold for this base model (auto then routes by the rule),
            {"budget": why} / {"skip": why} when the routes that use the predictor / the skip policy
            run with parts it was not measured with. Records of the affected routes say so.
        unavailable: {"predictor": why} when a part was left out (the modes needing it say why).
    """

    def __init__(self, base, student=None, *, student_steps: int = 8, student_guidance: float | None = None,
                 predictor=None, skip_policy: SkipPolicy | None = None, plateau_epsilon: float | None = None,
                 auto_student_max_steps: int | None = None, auto_student_guidance: float | None = None,
                 auto_policy=None, base_steps: int = 50, base_scheduler: str = "ddim",
                 student_scheduler: str = "ddim", bundle: Bundle | None = None, model_paths: dict | None = None,
                 calibration: dict | None = None, unavailable: dict | None = None):
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
        self.auto_policy = auto_policy
        self.base_steps = int(base_steps)
        self.base_scheduler = base_scheduler
        self.student_scheduler = student_scheduler
        self.bundle = bundle
        self.calibration = dict(calibration or {})
        self.unavailable = dict(unavailable or {})
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
            from budgetdiff.io.fingerprint import FingerprintError, unet_fingerprint

            try:
                sha = unet_fingerprint(path)
            except FingerprintError:
                sha = None
        return LoadedModel(name, pipe, path, sha)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, bundle: str | Path | Bundle | None = "models/bundle", model: str | Path | None = None,
                    budget_model: str | Path | None = None, skip_policy: str | Path | SkipPolicy | None = None,
                    device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Generator":
        """The one way to build a ``Generator`` from files: the bundle's models (fp16 on CUDA,
        fp32 on CPU), with any part replaced.

        Args:
            bundle: a bundle directory or a loaded ``Bundle``; None: no bundle (then ``model`` is
                required and only full / adaptive-with-explicit-skip / budget with
                ``budget_model`` can run).
            model: a ``BudgetDiffusionPipeline`` directory instead of the bundle's base model.
            budget_model: a budget predictor directory instead of the bundle's.
            skip_policy: a skip policy (file or ``SkipPolicy``) instead of the bundle's.
            device, dtype: where and in what precision the models run.

        The calibrated auto policy was measured with the bundle's own parts. A replaced base model
        with other UNet weights sets it aside (auto routes by the bundle's rule); a replaced
        predictor or skip policy keeps it, and the routes that use the replaced part say in their
        record that their measurement was made with the bundle's (``AutoRoute.calibration``).
        Raises ``BundleError`` whose ``part`` names what is missing or does not fit.
        """
        from budgetdiff.methods.budget import BudgetModelError, load_budget_predictor
        from budgetdiff.io.fingerprint import FingerprintError, directory_fingerprint, unet_fingerprint
        from budgetdiff.generation.loading import ModelDirectoryError, load_pipeline
        from budgetdiff.methods.policy import load_skip_policy

        if bundle is not None and not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle)
        if bundle is None and model is None:
            raise BundleError("bundle", "no bundle and no model to load")
        base_path = str(Path(model).resolve()) if model is not None else bundle.base
        replaced_base = bundle is not None and model is not None and Path(base_path) != Path(bundle.base)
        try:
            base = load_pipeline(base_path, device, dtype)
        except ModelDirectoryError as exc:
            if model is not None:
                raise BundleError("model", str(exc).removeprefix("model: ")) from None
            raise BundleError("bundle", str(exc), label="") from None
        if not isinstance(base, BudgetDiffusionPipeline):
            raise BundleError("model" if model is not None else "bundle",
                              f"the base model is a {type(base).__name__}; the engine serves "
                              "BudgetDiffusionPipeline models (stock SD/SDXL: budgetdiff.generation.loading)")
        student = None
        if bundle is not None and bundle.student is not None:
            try:
                student = load_pipeline(bundle.student.path, device, dtype)
            except ModelDirectoryError as exc:
                raise BundleError("bundle", str(exc), label="") from None
            if not isinstance(student, BudgetDiffusionPipeline):
                raise BundleError("bundle", f"the student model is a {type(student).__name__}; the engine serves "
                                            "BudgetDiffusionPipeline models")
            if not replaced_base and _same_text_encoder(bundle.base, bundle.student.path):
                student.text_encoder = base.text_encoder  # one frozen encoder in memory, not two
        calibration, unavailable = {}, {}
        if replaced_base:
            try:
                same_weights = unet_fingerprint(base_path) == unet_fingerprint(bundle.base)
            except FingerprintError:
                same_weights = False
            if not same_weights:
                calibration["base"] = (f"the base model was replaced by {base_path!r}, whose UNet is not the "
                                       f"one the auto policy was calibrated with ({bundle.base!r})")

        predictor, predictor_path = None, budget_model if budget_model is not None else (
            bundle.budget if bundle is not None else None)
        if predictor_path is not None:
            try:
                predictor = load_budget_predictor(predictor_path)
                predictor.check_model(base_path)
            except BudgetModelError as exc:
                if budget_model is not None or not replaced_base:
                    raise BundleError("budget_model" if budget_model is not None else "bundle",
                                      str(exc), label="budget") from None
                # the bundle's predictor was trained for the bundle's base, not the replacement
                predictor = None
                unavailable["predictor"] = f"the bundle's budget predictor does not fit this base model ({exc})"
            if (predictor is not None and budget_model is not None and bundle is not None
                    and bundle.budget is not None
                    and directory_fingerprint(predictor_path) != directory_fingerprint(bundle.budget)):
                calibration["budget"] = (f"the budget predictor was replaced by {str(predictor_path)!r}; the auto "
                                         "policy measured its budget plans with the bundle's")

        policy = bundle.skip_policy if bundle is not None else None
        if skip_policy is not None:
            try:
                replacement = skip_policy if isinstance(skip_policy, SkipPolicy) else load_skip_policy(skip_policy)
            except PolicyError as exc:
                raise BundleError("skip_policy", str(exc), label="skip policy") from None
            if policy is not None and replacement.sha256 != policy.sha256:
                calibration["skip"] = (f"the skip policy was replaced (sha256 {replacement.sha256}); the auto "
                                       "policy measured its skipping plans with the bundle's")
            policy = replacement

        auto = bundle.auto if bundle is not None else None
        spec = bundle.student if bundle is not None else None
        return cls(base, student, student_steps=spec.steps if spec else 8,
                   student_guidance=spec.guidance if spec else None,
                   predictor=predictor, skip_policy=policy,
                   plateau_epsilon=bundle.plateau_epsilon if bundle is not None and budget_model is None else None,
                   auto_student_max_steps=auto.student_max_steps if auto else None,
                   auto_student_guidance=auto.student_guidance if auto else None,
                   auto_policy=auto.policy if auto else None,
                   base_steps=bundle.base_steps if bundle is not None else 50,
                   base_scheduler=bundle.base_scheduler if bundle is not None else "ddim",
                   student_scheduler=spec.scheduler if spec else "ddim",
                   bundle=bundle, model_paths={"base": base_path, "student": spec.path if spec else None},
                   calibration=calibration, unavailable=unavailable)

    @classmethod
    def load(cls, bundle_dir: str | Path = "models/bundle", device: str | torch.device | None = None,
             dtype: torch.dtype | None = None) -> "Generator":
        """``from_bundle(bundle_dir)``: the bundle's own parts. Raises ``BundleError`` naming the
        part that is missing or does not fit."""
        return cls.from_bundle(bundle_dir, device=device, dtype=dtype)

    # ------------------------------------------------------------------------------------------
    def check_supported(self, request: GenerationRequest) -> None:
        """Raise ``RequestError`` when the loaded models cannot serve ``request`` (a mode whose
        part is missing, a scheduler the student was not distilled for). The request's own
        fields were checked when it was made."""
        mode = request.mode
        if mode in ("student", "auto") and "student" not in self.models:
            raise RequestError("mode", f"{mode} needs a student model, and this bundle has none")
        if mode in ("budget", "auto") and self.predictor is None:
            why = self.unavailable.get("predictor", "this bundle has none")
            raise RequestError("mode", f"{mode} needs a budget predictor: {why}")
        if mode == "auto" and self.auto_student_max_steps is None and self._auto_policy() is None:
            raise RequestError("mode", "auto needs the bundle's auto rule, and this bundle has none")
        if mode == "adaptive" and request.skip is None and self.skip_policy is None:
            raise RequestError("mode", "adaptive needs a skip policy, and this bundle has none")
        if mode == "adaptive" and request.skip is None:
            try:
                self.skip_policy.for_scheduler((request.scheduler or self.base_scheduler).lower())
            except PolicyError as exc:
                raise RequestError("scheduler", str(exc).removeprefix("scheduler: ")) from None
        if mode == "student" and request.scheduler is not None and request.scheduler.lower() != self.student_scheduler:
            raise RequestError("scheduler", f"the student was distilled for {self.student_scheduler}, "
                                            f"not {request.scheduler}")

    def _auto_policy(self):
        """The calibrated auto policy when it holds for the loaded base model, else None."""
        return None if "base" in self.calibration else self.auto_policy

    def plan(self, requests: Sequence[GenerationRequest]) -> list[Plan]:
        """Each request's plan, after checking that the loaded models can serve every request
        (the first that cannot raises ``RequestError`` with its position in a list of several)."""
        for i, r in enumerate(requests):
            try:
                self.check_supported(r)
            except RequestError as exc:
                raise (exc.at(i) if len(requests) > 1 else exc) from None
        policy = self._auto_policy()
        routes = {i: policy.choose(None if r.quality_target is None else float(r.quality_target))
                  for i, r in enumerate(requests) if r.mode == "auto" and policy is not None}
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

    def _plan_auto(self, r: GenerationRequest, route: tuple, budget: BudgetChoice | None) -> Plan:
        """An auto request under the calibrated auto policy."""
        cand, why = route
        policy = self.auto_policy
        base_guidance = float(self.models["base"].pipe.config.default_guidance_scale)
        scheduler = (r.scheduler or policy.scheduler or self.base_scheduler).lower()
        uses = ("budget" if cand is not None and cand.kind == "budget" else
                "skip" if cand is not None and cand.skip else None)
        calibration = ({"policy_applied": True, "measured_holds": False, "why": self.calibration[uses]}
                       if uses in self.calibration else None)
        auto = AutoRoute(cand.name if cand else "reference", why, policy=policy.describe(),
                         measured=({k: cand.measured.get(k) for k in ("gflops_per_image", "quality_mean",
                                                                     "quality_lower_bound")} if cand else None),
                         calibration=calibration)
        if cand is None:
            g = float(r.guidance) if r.guidance is not None else base_guidance
            return Plan("base", int(policy.reference.get("steps") or self.base_steps), scheduler, g, route=auto)
        if cand.model == "student":
            g = float(r.guidance) if r.guidance is not None else float(cand.guidance if cand.guidance is not None
                                                                        else self.student_guidance or base_guidance)
            return Plan("student", cand.steps or self.student_steps, self.student_scheduler, g, route=auto)
        g = float(r.guidance) if r.guidance is not None else float(cand.guidance if cand.guidance is not None
                                                                    else base_guidance)
        if cand.kind == "uniform" and cand.skip:
            config, source = self._skip_point(scheduler, None)
            return Plan("base", int(cand.steps), scheduler, g, config, skip_source=source, route=auto)
        if cand.kind == "uniform":
            return Plan("base", int(cand.steps), scheduler, g, route=auto)
        return Plan("base", budget.chosen_steps, scheduler, g, budget=budget, route=auto)

    def _choose_budgets(self, requests: list[GenerationRequest], overrides: list | None = None) -> list[BudgetChoice]:
        """BudgetFusion: each prompt's predicted curves and chosen step count, one batched
        prediction for all the prompts. ``overrides``: per request an auto candidate whose budget
        rule (quality q' or plateau ε) replaces the request's own."""
        from budgetdiff.methods.budget import PlateauRule, QualityTargetRule, choose_steps, quality_fraction, text_encoder_of

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
            out.append(BudgetChoice(
                budget_model=self.predictor.path, chosen_steps=int(choice.steps), rule=choice.rule,
                reached=choice.reached, per_level=choice.per_level,
                predicted_quality={k_: round(v, 5) for k_, v in predicted.items()},
                predicted_quality_min=round(min(predicted.values()), 5) if predicted else None,
                prediction_ms=round(prediction_ms, 3), prompt_truncated=c.prompt_truncated,
                predicted_curves=c.to_record(), notes=self._budget_notes(r, c, choice)))
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

    def _skip_point(self, scheduler: str, quality_target: float | None) -> tuple[AdaptiveSkipConfig, dict]:
        point = self.skip_policy.for_scheduler(scheduler).point_for_quality(quality_target)
        return point.config, {"point": point.name, **self.skip_policy.describe()}

    def _plan_one(self, r: GenerationRequest, budget: BudgetChoice | None) -> Plan:
        base_guidance = self.models["base"].pipe.config.default_guidance_scale
        scheduler = (r.scheduler or self.base_scheduler).lower()
        guidance = float(r.guidance) if r.guidance is not None else float(base_guidance)
        if r.mode == "full":
            return Plan("base", r.steps or self.base_steps, scheduler, guidance)
        if r.mode == "adaptive":
            if r.skip is not None:
                config, source = r.skip, {"point": "explicit", "path": None, "sha256": None, "source": "request"}
            else:
                config, source = self._skip_point(scheduler, r.quality_target)
            return Plan("base", r.steps or self.base_steps, scheduler, guidance, config, skip_source=source)
        if r.mode == "student":
            g = float(r.guidance) if r.guidance is not None else float(self.student_guidance or base_guidance)
            return Plan("student", self.student_steps, self.student_scheduler, g)
        steps = budget.chosen_steps
        if r.mode == "budget":
            return Plan("base", steps, scheduler, guidance, budget=budget)
        # auto by the older rule (no calibrated policy, or one that does not hold for this base)
        rule = {"student_max_steps": self.auto_student_max_steps, "student_guidance": self.auto_student_guidance}
        calibration = ({"policy_applied": False, "why": self.calibration["base"]}
                       if "base" in self.calibration and self.auto_policy is not None else None)
        if steps <= self.auto_student_max_steps:
            g = float(r.guidance) if r.guidance is not None else float(self.auto_student_guidance)
            route = AutoRoute("student", f"predicted budget {steps} <= {self.auto_student_max_steps}", rule=rule,
                              calibration=calibration)
            return Plan("student", self.student_steps, self.student_scheduler, g, budget=budget, route=route)
        config, source = self._skip_point(scheduler, r.quality_target)
        route = AutoRoute("base+skip", f"predicted budget {steps} > {self.auto_student_max_steps}", rule=rule,
                          calibration=calibration)
        return Plan("base", steps, scheduler, guidance, config, skip_source=source, budget=budget, route=route)

    # ------------------------------------------------------------------------------------------
    def __call__(self, requests: GenerationRequest | Sequence[GenerationRequest], output_type: str = "pil",
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: bool | Callable[[int], None] = False
                 ) -> list[GenerationResult]:
        """Generate one image per request, in order, through the step scheduler
        (``budgetdiff.generation.continuous``): requests of any plan share every UNet call they can, new ones
        join as others finish.

        Args:
            requests: a request or a list of them.
            output_type: "pil", "np" (H, W, 3) or "pt" (3, H, W), values in [0, 1].
            batch_size: the most guided images per UNet call (a row budget of 2 x batch_size:
                a guided image takes two rows, an unguided one); twice as many are in flight,
                so rows that skipping samples free are used.
            progress: True for a tqdm bar over images, or a callable given each finished call's
                image count.
        """
        from budgetdiff.generation.continuous import StepBatchConfig, StepBatcher

        single = isinstance(requests, GenerationRequest)
        requests = [requests] if single else list(requests)
        if not requests:
            return []
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
        batcher = StepBatcher(StepBatchConfig(max_rows=2 * batch_size, max_inflight=2 * batch_size, policy="fifo"))
        return self.run_batched(batcher, requests, output_type, progress)

    def run_batched(self, batcher, requests: Sequence[GenerationRequest], output_type: str = "pil",
                    progress: bool | Callable[[int], None] = False) -> list[GenerationResult]:
        """``requests`` through ``batcher`` (a ``continuous.StepBatcher`` not running a thread of
        its own), driven in this thread until they are done."""
        bar = None
        if progress is True:
            from tqdm import tqdm

            bar = tqdm(total=len(requests), desc="generate", unit="image", leave=False)
        on_image = (lambda i, r: bar.update(1)) if bar is not None else (
            (lambda i, r: progress(1)) if callable(progress) else None)
        try:
            ticket = batcher.submit(self, requests, output_type, on_image=on_image)
            batcher.run_until_idle()
            return ticket.future.result(timeout=0)
        finally:
            if bar is not None:
                bar.close()

    def run_grouped(self, requests: Sequence[GenerationRequest], output_type: str = "pil",
                    batch_size: int = DEFAULT_BATCH_SIZE) -> list[GenerationResult]:
        """Request-level batching, as the engine did before the step scheduler: requests with
        equal plans (``Plan.key``) run as pipeline calls of at most ``batch_size`` images, one
        group after another, each to its end. Kept as the baseline that ``bench_serve`` measures
        step-level batching against (``batching: request`` in a serving profile)."""
        requests = list(requests)
        if not requests:
            return []
        plans = self.plan(requests)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(plans):
            groups.setdefault(p.key, []).append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                self._run_chunk([requests[i] for i in chunk], [plans[i] for i in chunk], chunk, output_type,
                                results)
        return results

    def _run_chunk(self, requests: list[GenerationRequest], plans: list[Plan], indices: list[int],
                   output_type: str, results: list) -> None:
        plan = plans[0]
        model = self.models[plan.model]
        out = model.pipe([r.prompt for r in requests], num_inference_steps=plan.steps, guidance_scale=plan.guidance,
                         scheduler=plan.scheduler, seed=[r.seed for r in requests], output_type=output_type,
                         progress=False, adaptive=plan.skip)
        for j, (r, p, i, rec) in enumerate(zip(requests, plans, indices, out.records)):
            record = self._image_record(r, p, model, nfe=rec["nfe"], skip_mask=rec.get("skip_mask"),
                                        batch_size=rec["batch_size"], prompt_truncated=rec["prompt_truncated"],
                                        seconds=rec["seconds"], decision_seconds=rec.get("decision_seconds"))
            results[i] = GenerationResult(out.images[j], record)

    def _result(self, slot, now: float) -> GenerationResult:
        """The finished image of a step-scheduler slot and its record."""
        image = slot.pipe.to_output(slot.latents, slot.ticket.output_type)[0]
        state = slot.skip_state
        mask = state.skip_masks()[0] if state is not None else None
        record = self._image_record(
            slot.request, slot.plan, slot.model, nfe=slot.total_steps - (sum(mask) if mask else 0), skip_mask=mask,
            batch_size=slot.max_call_images, prompt_truncated=slot.truncated, seconds=slot.compute_seconds,
            decision_seconds=state.decision_seconds if state is not None else None,
            queue_seconds=slot.admitted - slot.ticket.submitted, latency_seconds=now - slot.ticket.submitted,
            mean_call_images=slot.call_images / slot.calls if slot.calls else None)
        return GenerationResult(image, record)

    def _image_record(self, r: GenerationRequest, p: Plan, model: LoadedModel, *, nfe: int, **ran) -> ImageRecord:
        """The one place an ``ImageRecord`` is built: the request, its plan and the policies that
        decided it, plus what ran (``ran``: skip mask, batch size, seconds, ...)."""
        return ImageRecord(
            prompt=r.prompt, mode=r.mode, request_id=r.request_id, quality_target=r.quality_target, model=model,
            steps=p.steps, nfe=nfe, scheduler=p.scheduler, guidance=p.guidance, seed=r.seed,
            unet_gflops=round(nfe * self.gflops_per_evaluation[(model.name, p.guidance != 1.0)], 4),
            skip_config=p.skip.to_record() if p.skip else None, skip_source=p.skip_source if p.skip else None,
            budget=p.budget, route=p.route, bundle=self.bundle.describe() if self.bundle else None, **ran)


def _same_text_encoder(base: str, student: str) -> bool:
    """True when the student's distillation record says its text encoder is the teacher's."""
    import json

    record = Path(student) / "distillation.json"
    try:
        linked = json.loads(record.read_text()).get("linked_to_teacher") or []
    except (OSError, ValueError):
        return False
    return "text_encoder" in linked
