"""The model bundle: everything a ``Generator`` serves, described by one ``bundle.json``.

A bundle names the base model, the step-distilled student, the budget predictor and the skip
policy, with the settings each was measured at (the student's guidance, the budget rule's ε, the
``auto`` routing rule). Paths are relative to the bundle directory, so a bundle copied together
with its models (the registry does this) loads from anywhere::

    {
      "format": "budgetdiff-bundle/1",
      "base":    {"path": "../base", "scheduler": "ddim", "steps": 50},
      "student": {"path": "../student-8", "steps": 8, "scheduler": "ddim", "guidance": 1.25,
                  "source": "reports/distill.json"},
      "budget":  {"path": "../budget", "plateau_epsilon": 0.014},
      "skip_policy": "skip_policy.json",
      "auto":    {"student_max_steps": 30, "student_guidance": 1.0, "scheduler": "ddim",
                  "source": "...", "policy": {...}}
    }

``auto.policy`` (optional) is the calibrated auto policy (``budgetdiff.methods.auto_policy``) the
``calibrate_auto`` stage measured; when present ``auto`` routes by it, otherwise by the older
student-threshold rule.

The ``bundle`` DVC stage writes ``models/bundle`` from the reports of the stages that measured
each setting; nothing in it is typed by hand.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from budgetdiff.methods.auto_policy import AutoPolicy, AutoPolicyError
from budgetdiff.io.fingerprint import content_sha256
from budgetdiff.methods.policy import PolicyError, SkipPolicy, load_skip_policy

BUNDLE_FORMAT = "budgetdiff-bundle/1"
BUNDLE_FILE = "bundle.json"


class BundleError(ValueError):
    """A bundle directory is missing, malformed, or names a part that is not there; or a part
    given to replace the bundle's does not fit.

    Args:
        part: what is at fault, as data: ``bundle`` (the bundle itself), ``model`` (a replacement
            base model), ``budget_model`` (a replacement predictor), ``skip_policy`` (a replacement
            skip policy). The command line names its flag from it.
        detail: what is wrong.
        label: the word ``str(error)`` starts with (default: the part's); "" when ``detail``
            already names its subject (a wrapped policy error).
    """

    LABELS = {"bundle": "bundle", "model": "model", "budget_model": "budget", "skip_policy": "skip policy"}

    def __init__(self, part: str, detail: str, label: str | None = None):
        self.part, self.detail = part, detail
        self.label = self.LABELS.get(part, part) if label is None else label
        super().__init__(f"{self.label}: {detail}" if self.label else detail)

    def __reduce__(self):  # pickles (Ray, multiprocessing) with its fields
        return (BundleError, (self.part, self.detail, self.label))


@dataclass(frozen=True)
class StudentSpec:
    """The step-distilled student: where it is, its step count and the guidance it was judged at."""

    path: str
    steps: int
    guidance: float
    scheduler: str = "ddim"
    source: str | None = None


@dataclass(frozen=True)
class AutoRule:
    """``auto`` mode's routing rule (see ``budgetdiff.generation.engine``): prompts whose predicted budget is
    at most ``student_max_steps`` go to the student at ``student_guidance``; the others run the
    base model at their predicted budget with the skip policy."""

    student_max_steps: int
    student_guidance: float
    scheduler: str = "ddim"
    source: str | None = None
    policy: AutoPolicy | None = None  # the calibrated auto policy; when set it replaces the rule above

    def to_record(self) -> dict:
        if self.policy is not None:
            return {"policy": self.policy.describe(), "scheduler": self.policy.scheduler}
        return {"student_max_steps": self.student_max_steps, "student_guidance": self.student_guidance,
                "scheduler": self.scheduler}


@dataclass(frozen=True)
class Bundle:
    """A loaded ``bundle.json`` with its paths resolved against the bundle directory."""

    root: str
    base: str
    base_scheduler: str
    base_steps: int
    student: StudentSpec | None
    budget: str | None
    plateau_epsilon: float | None
    skip_policy: SkipPolicy
    auto: AutoRule | None
    raw: dict = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """The content hash of ``bundle.json`` (its settings; the models carry their own hashes)."""
        return content_sha256(self.raw)

    def describe(self) -> dict:
        return {"path": self.root, "sha256": self.sha256}


def _number(d: dict, key: str, where: str, kind=float, minimum=None):
    if key not in d:
        raise BundleError("bundle", f"{where} lacks {key!r}")
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise BundleError("bundle", f"{where} {key!r} must be a number, got {value!r}")
    if kind is int and int(value) != value:
        raise BundleError("bundle", f"{where} {key!r} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise BundleError("bundle", f"{where} {key!r} must be >= {minimum}, got {value!r}")
    return kind(value)


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Read ``path/bundle.json`` and its skip policy; raise BundleError (one line) naming what is
    missing or wrong. The model directories are checked to exist, not loaded."""
    root = Path(path)
    file = root / BUNDLE_FILE
    if not root.is_dir():
        raise BundleError("bundle", f"directory {str(root)!r} does not exist (build it: dvc repro bundle)")
    if not file.is_file():
        raise BundleError("bundle", f"{str(root)!r} has no {BUNDLE_FILE}")
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError("bundle", f"{str(file)!r} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != BUNDLE_FORMAT:
        raise BundleError("bundle", f"{str(file)!r} is not a {BUNDLE_FORMAT} file")

    def part(rel: str | None, what: str, required: bool = True) -> str | None:
        if rel is None:
            if required:
                raise BundleError("bundle", f"{str(file)!r} names no {what}")
            return None
        resolved = (root / rel).resolve()
        if not resolved.exists():
            raise BundleError("bundle", f"{what} {str(resolved)!r} (from {str(file)!r}) does not exist")
        return str(resolved)

    base = raw.get("base") or {}
    base_path = part(base.get("path"), "base model")
    student = None
    if raw.get("student"):
        s = raw["student"]
        student = StudentSpec(part(s.get("path"), "student"), _number(s, "steps", "student", int, 1),
                              _number(s, "guidance", "student", float, 0), str(s.get("scheduler", "ddim")),
                              s.get("source"))
    budget = raw.get("budget") or {}
    budget_path = part(budget.get("path"), "budget predictor", required=False)
    epsilon = float(budget["plateau_epsilon"]) if budget.get("plateau_epsilon") is not None else None
    try:
        policy = load_skip_policy(part(raw.get("skip_policy"), "skip policy"))
    except PolicyError as exc:
        raise BundleError("bundle", str(exc), label="") from None
    auto = None
    if raw.get("auto"):
        a = raw["auto"]
        auto_policy = None
        if a.get("policy") is not None:
            try:
                auto_policy = AutoPolicy.from_dict(a["policy"], f"bundle {str(file)!r} auto.policy",
                                                   f"{file}#auto.policy")
            except AutoPolicyError as exc:
                raise BundleError("bundle", str(exc), label="") from None
        auto = AutoRule(_number(a, "student_max_steps", "auto", int, 0),
                        _number(a, "student_guidance", "auto", float, 0), str(a.get("scheduler", "ddim")),
                        a.get("source"), auto_policy)
    return Bundle(str(root.resolve()), base_path, str(base.get("scheduler", "ddim")), int(base.get("steps", 50)),
                  student, budget_path, epsilon, policy, auto, raw)


def write_bundle(path: str | os.PathLike, raw: dict, policy: SkipPolicy) -> None:
    """Write ``bundle.json`` and ``skip_policy.json`` into ``path`` atomically (file by file)."""
    from budgetdiff.io import atomic_write_json

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    policy.save(root / "skip_policy.json")
    atomic_write_json(root / BUNDLE_FILE, {**raw, "format": BUNDLE_FORMAT, "skip_policy": "skip_policy.json"})
