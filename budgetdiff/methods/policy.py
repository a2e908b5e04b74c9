"""Shipped policies: versioned JSON files that the engine loads by default.

A **skip policy** says, per scheduler, how AdaptiveDiffusion skips on a given model: a list of
measured operating points (δ, C_max, warm-up, reuse space, estimator, and what they cost and
kept on the prompts they were measured on) and the name of the default one. The stage that
measured them writes the file (``bench_adaptive`` through the ``bundle`` stage today, Ray Tune's
``tune_skip`` later); ``Generator`` and ``budgetdiff generate --adaptive`` read it::

    {
      "format": "budgetdiff-skip-policy/1",
      "source": {"stage": "bench_adaptive", "report": "reports/adaptive.json", ...},
      "steps": 50,                        # the step count the points were measured at
      "schedulers": {
        "ddim": {
          "default": "delta=0.1",
          "points": [
            {"name": "delta=0.1", "threshold": 0.1, "max_skip": 4, "warmup": 4, "reuse": "sample",
             "estimator": "paper",
             "measured": {"nfe_speedup": 2.82, "quality": 0.973, "pixel/ssim": 0.973, ...}},
            ...
          ]
        }, ...
      }
    }

``measured.quality`` is the realised quality (``budgetdiff.statistics.quality.realised_quality``: the lowest of
pixel SSIM, 1 − LPIPS and I-CLIP against the full-step image) of the point's mean levels, which is
what ``point_for_quality`` compares a request's ``quality_target`` against: adaptive mode's
``quality_target`` is a mean (``budgetdiff.statistics.quality.QUALITY_PROMISES``), not a per-request promise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from budgetdiff.methods.adaptive import AdaptiveSkipConfig
from budgetdiff.io.fingerprint import content_sha256

SKIP_POLICY_FORMAT = "budgetdiff-skip-policy/1"


class PolicyError(ValueError):
    """A policy file is missing, malformed or does not fit the request."""


@dataclass(frozen=True)
class OperatingPoint:
    """One measured skip configuration of one scheduler."""

    name: str
    config: AdaptiveSkipConfig
    measured: dict = field(default_factory=dict)

    @property
    def quality(self) -> float | None:
        q = self.measured.get("quality")
        return None if q is None else float(q)

    @property
    def nfe_speedup(self) -> float | None:
        s = self.measured.get("nfe_speedup")
        return None if s is None else float(s)

    def to_dict(self) -> dict:
        c = self.config
        return {"name": self.name, "threshold": c.threshold, "max_skip": c.max_skip, "warmup": c.warmup,
                "reuse": c.reuse, "estimator": c.estimator, "measured": dict(self.measured)}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "OperatingPoint":
        try:
            config = AdaptiveSkipConfig(threshold=float(d["threshold"]), max_skip=int(d["max_skip"]),
                                        warmup=int(d.get("warmup", 4)), estimator=d.get("estimator", "paper"),
                                        reuse=d.get("reuse", "epsilon"))
            return cls(str(d["name"]), config, dict(d.get("measured") or {}))
        except KeyError as exc:
            raise PolicyError(f"{where}: lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise PolicyError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class SchedulerPolicy:
    default: str
    points: tuple[OperatingPoint, ...]

    def point(self, name: str | None = None) -> OperatingPoint:
        name = name or self.default
        for p in self.points:
            if p.name == name:
                return p
        raise PolicyError(f"skip policy: no operating point {name!r}; have {', '.join(p.name for p in self.points)}")

    def point_for_quality(self, quality_target: float | None) -> OperatingPoint:
        """The default point without a target; with one, the point with the largest measured
        NFE speed-up whose measured quality reaches the target (the most conservative point,
        the one that keeps the most quality, when none does)."""
        if quality_target is None:
            return self.point()
        measured = [p for p in self.points if p.quality is not None]
        if not measured:
            return self.point()
        ok = [p for p in measured if p.quality >= quality_target]
        if ok:
            return max(ok, key=lambda p: (p.nfe_speedup or 1.0, p.quality))
        return max(measured, key=lambda p: p.quality)


@dataclass(frozen=True)
class SkipPolicy:
    """A skip policy file (module docstring): per scheduler, measured operating points."""

    schedulers: dict[str, SchedulerPolicy]
    source: dict = field(default_factory=dict)
    steps: int | None = None
    path: str | None = None

    def for_scheduler(self, scheduler: str) -> SchedulerPolicy:
        if scheduler not in self.schedulers:
            raise PolicyError(f"scheduler: the skip policy has no entry for {scheduler!r}; "
                              f"it covers {', '.join(sorted(self.schedulers))}")
        return self.schedulers[scheduler]

    def to_dict(self) -> dict:
        return {"format": SKIP_POLICY_FORMAT, "source": dict(self.source), "steps": self.steps,
                "schedulers": {name: {"default": s.default, "points": [p.to_dict() for p in s.points]}
                               for name, s in sorted(self.schedulers.items())}}

    @property
    def sha256(self) -> str:
        return content_sha256(self.to_dict())

    def describe(self) -> dict:
        """What a record says about the policy file: where it came from and its content hash."""
        return {"path": self.path, "sha256": self.sha256, "source": self.source.get("stage")}

    @classmethod
    def from_dict(cls, d: dict, where: str = "skip policy") -> "SkipPolicy":
        if not isinstance(d, dict) or d.get("format") != SKIP_POLICY_FORMAT:
            raise PolicyError(f"{where}: not a {SKIP_POLICY_FORMAT} file")
        raw = d.get("schedulers")
        if not isinstance(raw, dict) or not raw:
            raise PolicyError(f"{where}: 'schedulers' must name at least one scheduler")
        schedulers = {}
        for name, entry in raw.items():
            if not isinstance(entry, dict) or not entry.get("points"):
                raise PolicyError(f"{where}: scheduler {name!r} has no operating points")
            points = tuple(OperatingPoint.from_dict(p, f"{where}: {name} point {i}")
                           for i, p in enumerate(entry["points"]))
            names = [p.name for p in points]
            if len(set(names)) != len(names):
                raise PolicyError(f"{where}: scheduler {name!r} repeats an operating point name")
            default = entry.get("default") or names[0]
            if default not in names:
                raise PolicyError(f"{where}: scheduler {name!r} default {default!r} is not one of its points")
            schedulers[name] = SchedulerPolicy(default, points)
        steps = d.get("steps")
        return cls(schedulers, dict(d.get("source") or {}), None if steps is None else int(steps))

    def save(self, path: str | os.PathLike) -> None:
        from budgetdiff.io import atomic_write_json

        atomic_write_json(path, self.to_dict())


def load_skip_policy(path: str | os.PathLike) -> SkipPolicy:
    """Read a skip policy file; a missing or malformed file raises PolicyError naming it."""
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"skip policy: {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PolicyError(f"skip policy: {str(path)!r} is not valid JSON ({exc})") from None
    policy = SkipPolicy.from_dict(data, f"skip policy {str(path)!r}")
    return SkipPolicy(policy.schedulers, policy.source, policy.steps, str(path))
