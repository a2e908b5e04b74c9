"""The ``tune_skip`` params: the typed section (``TuneSkipConfig``, read once by the command
line), the checks types cannot express (before Ray starts), the baseline configurations and the
model's default guidance."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

SCHEDULER_NAMES = ("ddim", "dpmpp", "euler")
REUSE_CHOICES = ("epsilon", "sample", "output")
SEARCHES = ("optuna", "random")
MIN_WARMUP = 4  # budgetdiff.methods.adaptive.HISTORY: the estimator needs the latents of four steps
PAPER_DEFAULT = {"threshold": 0.01, "max_skip": 4, "warmup": 4}

Scheduler = Literal["ddim", "dpmpp", "euler"]
Reuse = Literal["epsilon", "sample", "output"]


# Field order follows params.yaml's: the report copies some of these mappings as they are.
@dataclass(frozen=True)
class SearchSpace:
    """``tune_skip.search_space`` (ranges checked by ``check_config``)."""

    threshold_min: float
    threshold_max: float
    max_skip_min: int
    max_skip_max: int
    reuse: list[Reuse]
    warmup_min: int
    warmup_max: int


@dataclass(frozen=True)
class Baseline:
    """``tune_skip.baseline``: bench_adaptive's hand-tuned configuration."""

    threshold: float
    max_skip: int = 4
    warmup: int = 4
    reuse: Union[Reuse, dict[str, Reuse]] = "epsilon"  # one for all schedulers, or per scheduler


@dataclass(frozen=True)
class Confirm:
    """``tune_skip.selection.confirm``: the default re-rendered on prompts of its own."""

    seed_offset: int
    prompts_per_level: dict[int, int]
    candidates: int = 3
    batch_size: Optional[int] = None  # None: every prompt in one call


@dataclass(frozen=True)
class Selection:
    """``tune_skip.selection``: the rule that picks points from the Optuna front."""

    loss_ratio: float = 1.0
    quality_levels: list[float] = field(default_factory=list)
    confirm: Optional[Confirm] = None


@dataclass(frozen=True)
class HoldoutTargets:
    nfe_speedup: dict[str, float] = field(default_factory=dict)  # per scheduler


@dataclass(frozen=True)
class Holdout:
    """``tune_skip.holdout``: the default points on bench_adaptive's prompts."""

    seed_offset: int
    prompts_per_level: dict[int, int]
    batch_size: int = 32
    remeasure_baseline: bool = False
    targets: Optional[HoldoutTargets] = None


@dataclass(frozen=True)
class TuneSkipConfig:
    """params.yaml's ``tune_skip`` section."""

    model: str
    schedulers: list[Scheduler]
    steps: int
    seed_offset: int
    prompts_per_level: dict[int, int]
    search_space: SearchSpace
    num_samples: int
    report_path: str
    plot_path: str
    policy_path: str
    clip_dir: Optional[str] = None  # None or missing: the quality level is left out
    guidance: Optional[float] = None
    searches: list[Literal["optuna", "random"]] = field(default_factory=lambda: ["optuna", "random"])
    optuna_startup_trials: int = 8
    seed: int = 0
    ablation_seeds: list[int] = field(default_factory=list)
    warm_start: bool = True
    cpus_per_trial: int = 1
    max_concurrent: Optional[int] = None
    ray_num_cpus: Optional[int] = None  # None: the machine's CPU count
    runtime_env: Optional[dict[str, Any]] = None
    worker_niceness: int = 0  # the private Ray's worker niceness (Ray's own default, 15, starves trials)
    batch_size: Optional[int] = None  # prompts per pipeline call in the trials; None: all in one
    baseline: Optional[Baseline] = None
    baseline_report: Optional[str] = None
    selection: Optional[Selection] = None
    holdout: Optional[Holdout] = None
    work_dir: str = ".cache/tune_skip"


class TuneConfigError(ValueError):
    """A tune_skip params value that cannot work; the message names the key."""


def absolute_path(path: str | os.PathLike | None) -> str | None:
    """Trials chdir into their trial directory: every path they see is absolute."""
    if path is None:
        return None
    p = Path(path)
    return str(p if p.is_absolute() else (Path.cwd() / p).resolve())


def _number(cfg: dict, key: str, where: str) -> float:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TuneConfigError(f"{where}.{key}: must be a finite number, got {v!r}")
    return float(v)


def _integer(cfg: dict, key: str, where: str, minimum: int) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise TuneConfigError(f"{where}.{key}: must be an integer >= {minimum}, got {v!r}")
    return v


def check_config(cfg: dict) -> dict:
    """Validate the ``tune_skip`` params (before Ray starts) and return them with absolute paths.
    Raises TuneConfigError naming the first bad key."""
    if not isinstance(cfg, dict):
        raise TuneConfigError("tune_skip: the params section must be a mapping")
    out = dict(cfg)
    for key in ("model", "schedulers", "search_space", "prompts_per_level", "seed_offset", "steps", "num_samples"):
        if key not in cfg:
            raise TuneConfigError(f"tune_skip.{key}: missing")
    scheds = cfg["schedulers"]
    if not isinstance(scheds, list) or not scheds:
        raise TuneConfigError("tune_skip.schedulers: must be a non-empty list")
    for s in scheds:
        if s not in SCHEDULER_NAMES:
            raise TuneConfigError(f"tune_skip.schedulers: unknown scheduler {s!r}; choose from {', '.join(SCHEDULER_NAMES)}")
    space = cfg["search_space"]
    if not isinstance(space, dict):
        raise TuneConfigError("tune_skip.search_space: must be a mapping")
    where = "tune_skip.search_space"
    lo, hi = _number(space, "threshold_min", where), _number(space, "threshold_max", where)
    if lo <= 0 or hi <= 0:
        raise TuneConfigError(f"{where}.threshold_min/threshold_max: δ is searched log-uniformly and must be > 0, "
                              f"got [{lo:g}, {hi:g}]")
    if lo >= hi:
        raise TuneConfigError(f"{where}.threshold_min: must be below threshold_max, got [{lo:g}, {hi:g}]")
    cmin, cmax = _integer(space, "max_skip_min", where, 1), _integer(space, "max_skip_max", where, 1)
    if cmin > cmax:
        raise TuneConfigError(f"{where}.max_skip_min: the C_max range [{cmin}, {cmax}] is empty")
    wmin, wmax = _integer(space, "warmup_min", where, MIN_WARMUP), _integer(space, "warmup_max", where, MIN_WARMUP)
    if wmin > wmax:
        raise TuneConfigError(f"{where}.warmup_min: the warm-up range [{wmin}, {wmax}] is empty")
    reuse = space.get("reuse")
    if not isinstance(reuse, list) or not reuse:
        raise TuneConfigError(f"{where}.reuse: must be a non-empty list of {', '.join(REUSE_CHOICES)}")
    for r in reuse:
        if r not in REUSE_CHOICES:
            raise TuneConfigError(f"{where}.reuse: unknown reuse space {r!r}; choose from {', '.join(REUSE_CHOICES)}")
    searches = cfg.get("searches", ["optuna", "random"])
    if not isinstance(searches, list) or not searches or searches[0] != "optuna":
        raise TuneConfigError("tune_skip.searches: must be a list starting with 'optuna' (the search that ships)")
    for s in searches:
        if s not in SEARCHES:
            raise TuneConfigError(f"tune_skip.searches: unknown search algorithm {s!r}; choose from {', '.join(SEARCHES)}")
    _integer(cfg, "num_samples", "tune_skip", 1)
    _integer(cfg, "steps", "tune_skip", 2)
    _integer(cfg, "seed_offset", "tune_skip", 0)
    if cfg.get("max_concurrent") is not None:
        _integer(cfg, "max_concurrent", "tune_skip", 1)
    _integer({"v": cfg.get("cpus_per_trial", 1)}, "v", "tune_skip.cpus_per_trial", 1)
    ppl = cfg["prompts_per_level"]
    if not isinstance(ppl, dict) or not ppl or any(int(v) < 0 for v in ppl.values()) or sum(int(v) for v in ppl.values()) < 1:
        raise TuneConfigError("tune_skip.prompts_per_level: must map object counts to prompt counts (at least one prompt)")
    g = cfg.get("guidance")
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0):
        raise TuneConfigError(f"tune_skip.guidance: must be null (the model's default) or a number >= 0, got {g!r}")
    sel = cfg.get("selection") or {}
    for q in sel.get("quality_levels", []):
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
            raise TuneConfigError(f"tune_skip.selection.quality_levels: each level must be in (0, 1], got {q!r}")
    extra = cfg.get("ablation_seeds") or []
    if not isinstance(extra, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in extra):
        raise TuneConfigError(f"tune_skip.ablation_seeds: must be a list of integer seeds, got {extra!r}")
    if int(cfg.get("seed", 0)) in extra or len(set(extra)) != len(extra):
        raise TuneConfigError("tune_skip.ablation_seeds: each seed once, and not tune_skip.seed itself")
    conf = sel.get("confirm")
    if conf:
        if not isinstance(conf, dict) or "prompts_per_level" not in conf or "seed_offset" not in conf:
            raise TuneConfigError("tune_skip.selection.confirm: needs prompts_per_level and seed_offset")
        others = {int(cfg["seed_offset"]), int((cfg.get("holdout") or {}).get("seed_offset", -1))}
        if int(conf["seed_offset"]) in others:
            raise TuneConfigError("tune_skip.selection.confirm.seed_offset: must differ from the tuning and "
                                  "held-out prompts' seed_offset")
        _integer({"v": conf.get("candidates", 3)}, "v", "tune_skip.selection.confirm.candidates", 1)
    model = absolute_path(cfg["model"])
    from budgetdiff.generation.loading import ModelDirectoryError, model_class_name

    try:
        out["model_class"] = model_class_name(model)
    except ModelDirectoryError as exc:
        raise TuneConfigError(f"tune_skip.{exc}") from None
    out["model"] = model
    for key in ("clip_dir", "work_dir", "report_path", "plot_path", "policy_path", "baseline_report"):
        if cfg.get(key) is not None:
            out[key] = absolute_path(cfg[key])
    hold = cfg.get("holdout")
    if hold:
        for key in ("prompts_per_level", "seed_offset"):
            if key not in hold:
                raise TuneConfigError(f"tune_skip.holdout.{key}: missing")
        if int(hold["seed_offset"]) == int(cfg["seed_offset"]):
            raise TuneConfigError("tune_skip.holdout.seed_offset: must differ from the tuning prompts' seed_offset")
    return out


def baseline_configs(cfg: dict, scheduler: str) -> dict:
    """{"hand": bench_adaptive's hand-tuned config (params ``baseline``), "paper": δ 0.01, C_max 4}."""
    b = cfg.get("baseline") or {}
    reuse = b.get("reuse", "epsilon")
    reuse = reuse.get(scheduler, "epsilon") if isinstance(reuse, dict) else reuse
    out = {"paper": {**PAPER_DEFAULT, "reuse": reuse}}
    if b:
        out["hand"] = {"threshold": float(b["threshold"]), "max_skip": int(b.get("max_skip", 4)),
                       "warmup": int(b.get("warmup", 4)), "reuse": reuse}
    return out


def default_guidance(cfg: dict) -> float:
    """The model's default guidance: BudgetDiffusionPipeline's config, else SD's 7.5."""
    index = json.loads((Path(cfg["model"]) / "model_index.json").read_text())
    return float(index.get("default_guidance_scale", 7.5))
