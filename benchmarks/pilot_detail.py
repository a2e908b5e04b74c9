"""DVC stage ``pilot_detail``: does the version-2 scene domain make steps matter? (no training)

For each candidate prompt (plain scenes, speckled objects, grainy and mottled backgrounds at three
strengths) this renders ``renders_per_prompt`` ground-truth images (the same prompt, one render
seed each: the grain differs, the scene does not), takes the eigenvalues of their per-pixel
covariance on the [-1, 1] scale, and computes exactly what deterministic DDIM with a perfect
(Gaussian minimum-MSE) denoiser keeps of that variance at each step count of ``steps``, on the
embedded model's own noise schedule (``budgetdiff.domain.detail``).

Two covariances per prompt: the detail's own (each render minus the same render without its
material and speckles: same seed, same sub-pixel jitter), which is what the prompt's detail words
add, and the whole image's, which also holds the jitter of object edges. The jitter is tiny and
low-dimensional (a few directions of large variance), where the Gaussian model is pessimistic: a
real denoiser of a near-deterministic edge keeps it. Reported per prompt and per detail class: the
share of the detail's variance kept (and of its standard deviation, the square root), the fewest
steps that keep 95 % of what 50 steps keep, the same for the whole image, and a convergence check
of the estimate (the first quarter of the renders against all of them).

Decision rule (issue "An embedded model that does what the prompt says"): the design is dropped if
8 steps keep >= ``drop_if_kept_at_8`` of the variance on the detailed prompts.

Params: ``pilot_detail`` in params.yaml. Outputs: ``report_path`` (JSON) and ``plot_path`` (PNG).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
from diffusers import DDIMScheduler
from tqdm import tqdm

from budgetdiff.domain.detail import sample_eigenvalues, variance_kept
from budgetdiff.io import atomic_write_json
from budgetdiff.domain.scenes import render_scene_array, sample_scene, spec_to_prompt, with_seed, without_detail
from mlops.cli import command
from mlops.params import load_config

# The domain's background materials and strengths (budgetdiff.domain.scenes MATERIALS, STRENGTHS).
Material = Literal["plain", "grainy", "mottled"]
Strength = Literal["faintly", "", "heavily"]


@dataclass(frozen=True)
class Candidate:
    """One candidate prompt's scene: its object count (None: drawn), background material and
    strength, and P(a plain object is speckled)."""

    n_objects: Optional[int] = None
    material: Material = "plain"
    strength: Strength = ""
    speckle_prob: float = 0.0


@dataclass(frozen=True)
class PilotDetailConfig:
    """The ``pilot_detail`` section of params.yaml."""

    scheduler: str
    renders_per_prompt: int
    render_seed_offset: int
    seed_offset: int
    steps: list[int]
    drop_if_kept_at_8: float
    candidates: list[Candidate]
    report_path: str
    plot_path: str


def candidate_specs(candidates: list[Candidate], seed_offset: int):
    """One scene per candidate, seeds from ``seed_offset``."""
    return [sample_scene(seed_offset + i, n_objects=c.n_objects, material=c.material, strength=c.strength,
                         speckle_prob=c.speckle_prob) for i, c in enumerate(candidates)]


def renders(spec, n: int, render_seed_offset: int) -> np.ndarray:
    """``n`` ground-truth renders of ``spec`` (render seeds from ``render_seed_offset``) on [-1, 1]."""
    return np.stack([render_scene_array(with_seed(spec, render_seed_offset + k)) for k in range(n)]
                    ).astype(np.float32) / 127.5 - 1.0


def steps_to_reach(kept: dict[int, float], share: float, reference: int = 50) -> int | None:
    """The fewest step counts of ``kept`` whose kept variance reaches ``share`` of ``reference``'s."""
    target = share * kept[reference]
    return next((s for s in sorted(kept) if kept[s] >= target), None)


def analyse(spec, n: int, render_seed_offset: int, scheduler, steps: list[int]) -> dict:
    images = renders(spec, n, render_seed_offset)
    detail = images - renders(without_detail(spec), n, render_seed_offset) if spec.has_detail else None
    whole = sample_eigenvalues(images)
    kept_whole = {s: variance_kept(whole, scheduler, s) for s in steps}
    row = {
        "prompt": spec_to_prompt(spec),
        "detail_class": spec.detail_class,
        "objects": spec.complexity,
        "whole_image": {"mean_pixel_sd": round(float(np.sqrt(whole.sum() / images[0].size)), 4),
                        "variance_kept": {str(s): round(v, 4) for s, v in kept_whole.items()},
                        "steps_to_95pct_of_50": steps_to_reach(kept_whole, 0.95) if 50 in kept_whole else None},
    }
    if detail is None:
        return {**row, "detail_mean_pixel_sd": 0.0, "variance_kept": None, "sd_kept": None,
                "steps_to_95pct_of_50": None, "convergence": None}
    lam = sample_eigenvalues(detail)
    quarter = sample_eigenvalues(detail[: max(2, n // 4)])
    kept = {s: variance_kept(lam, scheduler, s) for s in steps}
    return {
        **row,
        "detail_mean_pixel_sd": round(float(np.sqrt(lam.sum() / images[0].size)), 4),
        "variance_kept": {str(s): round(v, 4) for s, v in kept.items()},
        "sd_kept": {str(s): round(float(np.sqrt(v)), 4) for s, v in kept.items()},
        "steps_to_95pct_of_50": steps_to_reach(kept, 0.95) if 50 in kept else None,
        "convergence": {"renders": [max(2, n // 4), n],
                        "variance_kept_at_8": [round(variance_kept(quarter, scheduler, 8), 4),
                                               round(kept.get(8, variance_kept(lam, scheduler, 8)), 4)]},
    }


def class_summary(rows: list[dict], steps: list[int]) -> dict:
    classes: dict[str, list[dict]] = {}
    for r in rows:
        classes.setdefault(r["detail_class"], []).append(r)
    out = {}
    for c, rs in classes.items():
        mean = lambda key, s: round(float(np.mean([key(r)[str(s)] for r in rs])), 4)  # noqa: E731
        out[c] = {"prompts": len(rs),
                  "detail_mean_pixel_sd": round(float(np.mean([r["detail_mean_pixel_sd"] for r in rs])), 4),
                  "variance_kept": ({str(s): mean(lambda r: r["variance_kept"], s) for s in steps}
                                    if rs[0]["variance_kept"] else None),
                  "steps_to_95pct_of_50": [r["steps_to_95pct_of_50"] for r in rs],
                  "whole_image_variance_kept": {str(s): mean(lambda r: r["whole_image"]["variance_kept"], s)
                                                for s in steps}}
    return out


def plot(rows: list[dict], steps: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted({r["detail_class"] for r in rows})
    colours = dict(zip(classes, plt.cm.tab10(np.linspace(0, 1, 10))))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = set()
    for r in rows:
        c = r["detail_class"]
        if r["variance_kept"] is None:
            continue
        ax.plot(steps, [r["variance_kept"][str(s)] for s in steps], "o-", ms=3, color=colours[c],
                label=None if c in seen else c)
        seen.add(c)
    ax.set_xscale("log")
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("DDIM steps")
    ax.set_ylabel("share of the detail's variance kept")
    ax.set_title("Perfect-denoiser DDIM on the version-2 scenes (exact, Gaussian)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: PilotDetailConfig) -> dict:
    t0 = time.time()
    scheduler = DDIMScheduler.from_pretrained(cfg.scheduler)
    steps = sorted(cfg.steps)
    specs = candidate_specs(cfg.candidates, cfg.seed_offset)
    rows = [analyse(spec, cfg.renders_per_prompt, cfg.render_seed_offset, scheduler, steps)
            for spec in tqdm(specs, desc="pilot_detail", unit="prompt")]
    detailed = [r for r in rows if r["variance_kept"] is not None]
    worst = max(r["variance_kept"]["8"] for r in detailed) if detailed and 8 in steps else None
    verdict = ("drop the design" if worst is not None and worst >= cfg.drop_if_kept_at_8
               else "go: every detailed prompt loses more than the rule allows at 8 steps")
    report = {
        "what": "exact variance kept by deterministic DDIM with a perfect Gaussian denoiser, per candidate prompt",
        "scheduler": cfg.scheduler,
        "renders_per_prompt": cfg.renders_per_prompt,
        "steps": steps,
        "prompts": rows,
        "classes": class_summary(rows, steps),
        "decision": {"rule": f"drop if 8 steps keep >= {cfg.drop_if_kept_at_8} of the variance on a detailed prompt",
                     "largest_variance_kept_at_8_on_detailed": worst, "verdict": verdict},
        "note": ("variance kept is Var(output)/Var(data); the share of standard deviation kept is its square "
                 "root (detail of s.d. 0.1 keeps 22/53/78 % of its variance, 47/73/88 % of its s.d., at 8/20/50 steps)"),
        "seconds": round(time.time() - t0, 1),
    }
    plot(rows, steps, cfg.plot_path)
    atomic_write_json(cfg.report_path, report)
    return report


@command
def main() -> None:
    report = run(load_config("pilot_detail", PilotDetailConfig))
    for c, s in report["classes"].items():
        kept = s["variance_kept"] or s["whole_image_variance_kept"]
        print(f"pilot_detail: {c:>16}: {'detail' if s['variance_kept'] else 'whole image'} variance kept at "
              f"8/20/50 = {kept.get('8')}/{kept.get('20')}/{kept.get('50')}; "
              f"steps to 95 % of 50: {s['steps_to_95pct_of_50']}")
    print(f"pilot_detail: {report['decision']['verdict']} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
