"""The auto policy: the plans ``auto`` mode chooses between, each with what was measured on it.

``calibrate_auto`` (pipelines/calibrate_auto.py) renders every candidate plan on calibration
prompts of its own and writes this file; the bundle embeds it; ``Generator`` routes ``auto``
requests by it:

- no ``quality_target``: the ``default`` candidate (the cheapest that kept attr_acc and CLIP-T
  within the tolerances of the full-step images);
- ``quality_target`` q: the cheapest candidate whose conformal lower bound of realised quality
  (``budgetdiff.statistics.quality``) at the policy's ``coverage`` is >= q, i.e. a request asking for q gets
  an image of realised quality >= q with probability >= coverage (marginally over prompts like the
  calibration ones): auto's ``quality_target`` is a **coverage** promise; when no candidate
  reaches q, the reference plan (the base model at its full steps).

Format ``budgetdiff-auto-policy/1``::

    {"format": "budgetdiff-auto-policy/1", "scheduler": "ddim", "coverage": 0.95,
     "tolerances": {"attr_acc": 0.01, "clipt": 0.005}, "default": "base@6",
     "reference": {"model": "base", "steps": 50, "gflops_per_image": 81.8, ...},
     "candidates": [{"name": "base@6", "kind": "uniform", "model": "base", "steps": 6,
                     "measured": {"gflops_per_image": ..., "quality_lower_bound": {"0.95": ...}, ...}},
                    {"name": "budget q'0.9", "kind": "budget", "model": "base", "budget_quality": 0.9, ...}],
     "source": {...}}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

AUTO_POLICY_FORMAT = "budgetdiff-auto-policy/1"
KINDS = ("uniform", "budget")


class AutoPolicyError(ValueError):
    """An auto policy file is missing, malformed, or cannot serve a request."""


@dataclass(frozen=True)
class AutoCandidate:
    """One plan auto may run: ``uniform`` (a model at fixed steps and guidance; with ``skip`` the base
    model skips by the bundle's skip policy, its default point for the scheduler) or ``budget`` (the
    base model at the predictor's per-prompt steps under a quality-target rule q' or plateau ε)."""

    name: str
    kind: str
    model: str
    steps: int | None = None
    guidance: float | None = None
    budget_quality: float | None = None
    budget_epsilon: float | None = None
    measured: dict = field(default_factory=dict)
    skip: bool = False

    def to_dict(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "model": self.model}
        if self.skip:
            d["skip"] = True
        for k in ("steps", "guidance", "budget_quality", "budget_epsilon"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        d["measured"] = self.measured
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "AutoCandidate":
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise AutoPolicyError(f"{where}: a candidate needs a name")
        w = f"{where} candidate {d['name']!r}"
        if d.get("kind") not in KINDS:
            raise AutoPolicyError(f"{w}: kind must be one of {', '.join(KINDS)}, got {d.get('kind')!r}")
        if d.get("model") not in ("base", "student"):
            raise AutoPolicyError(f"{w}: model must be base or student, got {d.get('model')!r}")
        c = cls(d["name"], d["kind"], d["model"], d.get("steps"), d.get("guidance"), d.get("budget_quality"),
                d.get("budget_epsilon"), dict(d.get("measured") or {}), bool(d.get("skip", False)))
        if c.skip and (c.model != "base" or c.kind != "uniform"):
            raise AutoPolicyError(f"{w}: skip applies to a uniform candidate of the base model")
        if c.kind == "uniform" and (not isinstance(c.steps, int) or c.steps < 1):
            raise AutoPolicyError(f"{w}: a uniform candidate needs integer steps >= 1")
        if c.kind == "budget" and (c.model != "base" or (c.budget_quality is None) == (c.budget_epsilon is None)):
            raise AutoPolicyError(f"{w}: a budget candidate runs the base model with exactly one of "
                                  "budget_quality and budget_epsilon")
        if not isinstance(c.measured.get("gflops_per_image"), (int, float)):
            raise AutoPolicyError(f"{w}: measured.gflops_per_image is missing")
        return c

    def lower_bound(self, coverage: float) -> float | None:
        v = (self.measured.get("quality_lower_bound") or {}).get(f"{coverage:g}")
        return None if v is None else float(v)


@dataclass(frozen=True)
class AutoPolicy:
    scheduler: str
    coverage: float
    tolerances: dict
    default: str
    candidates: tuple[AutoCandidate, ...]
    reference: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    path: str | None = None

    def candidate(self, name: str) -> AutoCandidate:
        for c in self.candidates:
            if c.name == name:
                return c
        raise AutoPolicyError(f"auto policy: no candidate named {name!r}")

    def choose(self, quality_target: float | None) -> tuple[AutoCandidate | None, str]:
        """(candidate, why) for a request; candidate None means the reference plan (full steps)."""
        if quality_target is None:
            return self.candidate(self.default), "default: " + str(self.source.get("default_rule", "cheapest within tolerances"))
        ok = [c for c in self.candidates if (c.lower_bound(self.coverage) or -1.0) >= quality_target]
        if not ok:
            return None, (f"no candidate reaches quality {quality_target:g} for {self.coverage:.0%} of calibration "
                          f"images: the reference plan ({self.reference.get('steps')} steps)")
        best = min(ok, key=lambda c: c.measured["gflops_per_image"])
        return best, (f"cheapest candidate whose {self.coverage:.0%} conformal lower bound of realised quality "
                      f"({best.lower_bound(self.coverage):.4f}) reaches {quality_target:g}")

    def to_dict(self) -> dict:
        return {"format": AUTO_POLICY_FORMAT, "scheduler": self.scheduler, "coverage": self.coverage,
                "tolerances": self.tolerances, "default": self.default, "reference": self.reference,
                "candidates": [c.to_dict() for c in self.candidates], "source": self.source}

    @property
    def sha256(self) -> str:
        from budgetdiff.io.fingerprint import content_sha256

        return content_sha256(self.to_dict())

    def describe(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "default": self.default, "coverage": self.coverage}

    @classmethod
    def from_dict(cls, d: dict, where: str = "auto policy", path: str | None = None) -> "AutoPolicy":
        if not isinstance(d, dict) or d.get("format") != AUTO_POLICY_FORMAT:
            raise AutoPolicyError(f"{where}: not a {AUTO_POLICY_FORMAT} document")
        cov = d.get("coverage")
        if isinstance(cov, bool) or not isinstance(cov, (int, float)) or not 0 < cov < 1:
            raise AutoPolicyError(f"{where}: coverage must be in (0, 1), got {cov!r}")
        cands = tuple(AutoCandidate.from_dict(c, where) for c in d.get("candidates") or [])
        if not cands:
            raise AutoPolicyError(f"{where}: has no candidates")
        if len({c.name for c in cands}) != len(cands):
            raise AutoPolicyError(f"{where}: two candidates share a name")
        policy = cls(str(d.get("scheduler", "ddim")), float(cov), dict(d.get("tolerances") or {}), str(d.get("default")),
                     cands, dict(d.get("reference") or {}), dict(d.get("source") or {}), path)
        policy.candidate(policy.default)  # the default must exist
        return policy

    def save(self, path: str | os.PathLike) -> None:
        from budgetdiff.io import atomic_write_json

        atomic_write_json(path, self.to_dict())


def load_auto_policy(path: str | os.PathLike) -> AutoPolicy:
    p = Path(path)
    if not p.is_file():
        raise AutoPolicyError(f"auto policy: {str(p)!r} does not exist (build it: dvc repro calibrate_auto)")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise AutoPolicyError(f"auto policy: {str(p)!r} is not valid JSON ({exc})") from None
    return AutoPolicy.from_dict(data, f"auto policy {str(p)!r}", str(p))
