"""Benchmark stage ``bench_distill``: do the 8-step students do what the teacher does in 16-50?

For each run (the teacher runs of ``runs``: teacher@50, @16 and @8; then ``student_16`` and one
``student_8_<variant>`` per entry of ``distill_8_variants``, the list dvc.yaml's foreach trains:
``distilled_runs``) and each guidance scale in ``guidance_scales``,
generate one image per held-out prompt (a seed range of its own; the same prompts and initial
noise for every run) with DDIM and measure
- ``dist/fd_domainclip``: Fréchet distance in the domain CLIP's image space between the generated
  set and the rendered ground-truth scenes of the same prompts (lower is better),
- ``high/clipt_domainclip``: mean image-text cosine similarity (SnapFusion's CLIP score),
- ``domain/attr_acc``: mean fraction of the prompt's attributes the trained attribute checker finds,
- NFE (denoising-network evaluations per image; a CFG pair batched as one call counts once),
  GFLOPs per image (``torch.utils.flop_counter``), and wall-clock seconds per image at
  ``batch_size`` on this machine.

The CLIP-T target compares two training methods (CFG-aware against vanilla), and one training run
of each differs from another by its seed as well as its method, so it is judged on the mean over
training-seed replicates (``training_seeds``: a variant that differs from another only in its seed
and paths is that variant's replicate), paired by seed; the FD and attr_acc targets judge the
shipped student, models/student-8. Replicates are scored like every run but stay out of the
sample grid, and show as hollow markers in the plot.

Writes reports/distill.json (every number, and the targets with pass/fail at the target
guidance), reports/distill_tradeoff.csv and .png (FD against CLIP-T across guidance scales, as
SnapFusion's Fig. 6) and reports/distill_samples.png (ground truth, then each run).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from budgetdiff.domain.evaluators import load_attribute_checker
from budgetdiff.generation.loading import load_pipeline
from budgetdiff.io import atomic_write_bytes, atomic_write_json, png_bytes
from budgetdiff.metrics import MetricScorer, ScoringConfig
from budgetdiff.metrics.semantic import load_clip_backbone
from budgetdiff.domain.scenes import held_out_scenes, render_scene_array
from budgetdiff.io.fingerprint import content_sha256, unet_fingerprint
from mlops.cli import command

FD, CLIPT, ATTR = "dist/fd_domainclip", "high/clipt_domainclip", "domain/attr_acc"
Scheduler = Literal["ddim", "dpmpp", "euler"]  # budgetdiff.generation.pipeline.SCHEDULERS


@dataclass(frozen=True)
class RunSpec:
    """One run: the model directory and its DDIM steps."""

    model: str
    steps: int


@dataclass(frozen=True)
class DistillTargets:
    fd_max_ratio_to_teacher_50: float


@dataclass(frozen=True)
class BenchDistillConfig:
    """The ``bench_distill`` section of params.yaml (``runs``: the teacher runs; ``main`` adds the
    students from the distill stages' params, ``distilled_runs``)."""

    runs: dict[str, RunSpec]
    guidance_scales: list[float]
    guidance: Optional[float]
    scheduler: Scheduler
    prompts: int
    count_weights: tuple[float, ...]
    seed_offset: int
    batch_size: int
    targets: DistillTargets
    grid_prompts: int
    clip_dir: str
    attributes_dir: str
    report_path: str
    csv_path: str
    plot_path: str
    grid_path: str
    cache_dir: str = ".cache/bench_distill"


def generate(pipe, prompts: list[str], steps: int, guidance: float, scheduler: str, batch_size: int, desc: str):
    """(images (N, 3, H, W) in [0, 1], seconds per image, NFE per image); image i uses seed i."""
    out = pipe.generate_in_batches(prompts, batch_size, seed=0, output_type="pt", desc=desc,
                                   num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler)
    return (out.images, sum(r["seconds"] for r in out.records) / len(prompts),
            float(np.mean([r["nfe"] for r in out.records])))


def sample_grid(columns: dict[str, list[Image.Image]], prompts: list[str], truth: list[np.ndarray],
                subtitle: str = "", cell: int = 112) -> Image.Image:
    """Rows: prompt text, ground truth, then each run's image (same seed); ``subtitle`` under
    each run's name (the guidance)."""
    text_w, header = 260, 30
    names = ["ground truth"] + list(columns)
    grid = Image.new("RGB", (text_w + cell * len(names), header + cell * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(names):
        draw.text((text_w + j * cell + 4, 3), name[:18], fill="black")
        if j:
            draw.text((text_w + j * cell + 4, 15), subtitle, fill="black")
    for i, prompt in enumerate(prompts):
        y = header + i * cell
        draw.multiline_text((4, y + 4), "\n".join(textwrap.wrap(prompt, 42)), fill="black", spacing=2)
        row = [Image.fromarray(truth[i])] + [images[i] for images in columns.values()]
        for j, img in enumerate(row):
            grid.paste(img.resize((cell - 4, cell - 4), Image.Resampling.NEAREST), (text_w + j * cell + 2, y + 2))
    return grid


def tradeoff_plot(results: dict, path: str, steps: dict[str, int] | None = None,
                  training_seeds: dict[str, list[str]] | None = None) -> None:
    """FD (lower is better) against CLIP-T (higher is better), one curve per run, each point a
    guidance scale (SnapFusion Fig. 6): every run on the left, the 8-step runs (``steps``) alone on
    the right, where they crowd together on the left. A run's training-seed replicates
    (``training_seeds``) are not curves of their own: they are hollow markers in its colour on
    the right, to show how far one training run's luck moves a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, training_seeds = steps or {}, training_seeds or {}
    replicates = {r for reps in training_seeds.values() for r in reps}
    results_all, results = results, {n: r for n, r in results.items() if n not in replicates}
    few = [n for n in results if steps.get(n, 0) and steps[n] <= 8] or list(results)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    colours = dict(zip(results, plt.cm.tab10.colors))
    for ax, names, title in ((axes[0], list(results), "all runs"), (axes[1], few, "8-step runs")):
        for name in names:
            by_g = results[name]
            gs = sorted(by_g, key=float)
            xs, ys = [by_g[g]["clipt"] for g in gs], [by_g[g]["fd"] for g in gs]
            ax.plot(xs, ys, marker="o", label=name, color=colours[name],
                    linestyle="--" if name.startswith("teacher") else "-")
            if ax is axes[1] or name not in few:
                for g, x, y in zip(gs, xs, ys):
                    ax.annotate(f"w={g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if ax is axes[1]:
                reps = [r for r in training_seeds.get(name, []) if r in results_all]
                pts = [(v["clipt"], v["fd"]) for r in reps for v in results_all[r].values()]
                if pts:
                    ax.scatter(*zip(*pts), facecolors="none", edgecolors=colours[name], s=28,
                               label=f"{name}: other training seeds ({len(reps)})")
        ax.set_xlabel("CLIP-T (high/clipt_domainclip, higher is better)")
        ax.set_ylabel("FD (dist/fd_domainclip vs rendered scenes, lower is better)")
        ax.set_title(f"FD vs CLIP-T across guidance scales: {title}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def paired_difference(a, b) -> dict | None:
    """Mean of a − b over the prompts both scored (the same prompts and seeds), its standard
    error and a normal 95 % interval: is a shortfall more than the prompt-to-prompt noise?"""
    if a is None or b is None:
        return None
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[np.isfinite(d)]
    if len(d) < 2:
        return None
    mean, se = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
    return {"mean": round(mean, 5), "se": round(se, 5), "ci95": [round(mean - 1.96 * se, 5), round(mean + 1.96 * se, 5)],
            "prompts": int(len(d))}


REPLICATE_KEYS = ("seed", "output_dir", "metrics_path", "checkpoint_dir")  # what a training-seed replicate changes


def distilled_runs(distill: dict, distill_16: dict, distill_8: dict, variants: dict
                   ) -> tuple[dict[str, RunSpec], dict[str, list[str]]]:
    """The students' runs and their training-seed replicates, read from the distill stages' own
    params, so that params.yaml lists the replicates once (``distill_8_variants``, which dvc.yaml's
    foreach trains): ``student_16``, then ``student_8_<key>`` per variant in its order; a variant
    whose seed differs from ``distill.seed`` and whose other settings equal one seed-0 variant's
    is that variant's replicate. The distill sections are read as plain data (their types are the
    distill stages'): a replicate is recognised by comparing whole variant sections. Returns
    (runs, training_seeds)."""
    runs = {"student_16": RunSpec(distill_16["output_dir"], int(distill_16["student_steps"]))}
    for key, v in variants.items():
        runs[f"student_8_{key}"] = RunSpec(v["output_dir"], int(v.get("student_steps", distill_8["student_steps"])))
    seed0 = distill.get("seed", 0)

    def settings(v: dict) -> dict:
        return {k: x for k, x in v.items() if k not in REPLICATE_KEYS}

    bases = [k for k, v in variants.items() if v.get("seed", seed0) == seed0]
    training_seeds: dict[str, list[str]] = {}
    for key, v in variants.items():
        if key in bases:
            continue
        match = [b for b in bases if settings(variants[b]) == settings(v)]
        if len(match) != 1:
            raise ValueError(f"distill_8_variants.{key}: a seed-{v['seed']} replicate must share every setting but "
                             f"{', '.join(REPLICATE_KEYS)} with exactly one seed-{seed0} variant, found {len(match)}")
        training_seeds.setdefault(f"student_8_{match[0]}", []).append(f"student_8_{key}")
    return runs, training_seeds


def seed_runs(training_seeds: Mapping[str, list[str]] | None) -> list[tuple[str, str]]:
    """The (CFG-aware, vanilla) student runs trained with the same seed, seed 0 first: the runs
    ``student_8_cfg`` and ``student_8_vanilla`` and, position by position, their replicates in
    ``training_seeds`` (run -> its replicates, ``distilled_runs``). ``run`` calls it before any
    work, so a bad list fails at once."""
    reps = training_seeds or {}
    cfg_runs = ["student_8_cfg", *reps.get("student_8_cfg", [])]
    van_runs = ["student_8_vanilla", *reps.get("student_8_vanilla", [])]
    if len(cfg_runs) != len(van_runs):
        raise ValueError(f"bench_distill: training_seeds lists {len(cfg_runs) - 1} replicate(s) of "
                         f"student_8_cfg but {len(van_runs) - 1} of student_8_vanilla (they pair by position)")
    return list(zip(cfg_runs, van_runs))


def seed_pairs(results: dict, guidance: str, training_seeds: Mapping[str, list[str]] | None) -> list[tuple[str, str]]:
    """``seed_runs`` with both results at ``guidance``."""
    return [(c, v) for c, v in seed_runs(training_seeds)
            if results.get(c, {}).get(guidance) is not None and results.get(v, {}).get(guidance) is not None]


def check_targets(results: dict, guidance: str, targets: DistillTargets,
                  training_seeds: Mapping[str, list[str]] | None = None, per_prompt: dict | None = None) -> dict:
    """The issue's targets at ``guidance`` (a key of each run's results); null when a run is absent.
    With ``per_prompt`` (run -> guidance -> metric -> per-prompt values), the two paired targets
    also get the paired per-prompt difference (measured − limit) with its 95 % interval.

    The FD and attr_acc targets judge the shipped student (``student_8_cfg``) against the teacher.
    The CLIP-T target compares two training methods, so it is judged on the mean over the training
    seeds in ``training_seeds`` (``seed_pairs``): measured and limit are the two methods' CLIP-T
    averaged over the seeds, and the paired difference averages each prompt's difference over the
    seeds; ``training_seeds`` adds each seed's difference, their spread and seed 0's run alone.
    Without replicates this is the single pair."""
    at = {name: by_g.get(guidance) for name, by_g in results.items()}

    def value(run, key):
        return None if at.get(run) is None else at[run][key]

    ratio = targets.fd_max_ratio_to_teacher_50
    fd_s, fd_t = value("student_8_cfg", "fd"), value("teacher_50", "fd")
    att_s, att_t = value("student_8_cfg", "attr_acc"), value("teacher_8", "attr_acc")
    pairs = seed_pairs(results, guidance, training_seeds)
    cl_s = float(np.mean([value(c, "clipt") for c, _ in pairs])) if pairs else None
    cl_v = float(np.mean([value(v, "clipt") for _, v in pairs])) if pairs else None
    out = {
        "fd_student_8_cfg_le_1.1x_teacher_50": {"measured": fd_s, "limit": None if fd_t is None else ratio * fd_t},
        "attr_acc_student_8_cfg_ge_teacher_8": {"measured": att_s, "limit": att_t},
        "clipt_student_8_cfg_ge_student_8_vanilla": {"measured": cl_s, "limit": cl_v},
    }
    per_prompt = per_prompt or {}

    def values(run, key):
        return per_prompt.get(run, {}).get(guidance, {}).get(key)

    out["attr_acc_student_8_cfg_ge_teacher_8"]["paired_difference"] = paired_difference(
        values("student_8_cfg", "attr_acc"), values("teacher_8", "attr_acc"))
    clipt = out["clipt_student_8_cfg_ge_student_8_vanilla"]
    # Each prompt's CLIP-T averaged over the seeds, per method: their difference is the per-prompt
    # difference averaged over the seeds.
    by_run = {run: values(run, "clipt") for pair in pairs for run in pair}
    clipt["paired_difference"] = (
        paired_difference(*(np.mean([np.asarray(by_run[p[i]], dtype=float) for p in pairs], axis=0) for i in (0, 1)))
        if pairs and all(v is not None for v in by_run.values()) else None)
    if pairs:
        by_seed = [value(c, "clipt") - value(v, "clipt") for c, v in pairs]
        clipt["training_seeds"] = {
            "pairs": [list(p) for p in pairs],
            "difference_by_seed": [round(d, 5) for d in by_seed],
            "difference_sd_across_seeds": round(float(np.std(by_seed, ddof=1)), 5) if len(by_seed) > 1 else None,
            "seed_0_alone": {"measured": value(pairs[0][0], "clipt"), "limit": value(pairs[0][1], "clipt"),
                             "met": bool(by_seed[0] >= 0)},
        }
    for name, t in out.items():
        if t["measured"] is None or t["limit"] is None:
            t["met"] = None
        else:
            t["met"] = bool(t["measured"] <= t["limit"]) if name.startswith("fd") else bool(t["measured"] >= t["limit"])
    return out


def training_seed_spread(results: dict, training_seeds: Mapping[str, list[str]] | None) -> dict:
    """Per replicated run and guidance: each metric's mean, sample sd and values over its training
    seeds (the run itself first): how much one training run's luck moves the numbers."""
    out = {}
    for base, reps in (training_seeds or {}).items():
        names = [n for n in (base, *reps) if n in results]
        by_g = {}
        for g in results.get(base, {}):
            rows = [results[n][g] for n in names if g in results[n]]
            if len(rows) > 1:
                by_g[g] = {k: {"mean": float(np.mean([r[k] for r in rows])),
                               "sd": float(np.std([r[k] for r in rows], ddof=1)),
                               "values": [r[k] for r in rows]} for k in ("fd", "clipt", "attr_acc")}
        out[base] = {"runs": names, "by_guidance": by_g}
    return out


def rendered(specs) -> torch.Tensor:
    return torch.from_numpy(np.stack([render_scene_array(s) for s in specs])).permute(0, 3, 1, 2).float() / 255.0


def result_key(fingerprint: str, steps: int, guidance: float, n_prompts: int, cfg: BenchDistillConfig) -> str:
    """The cache key of one (run, guidance) result: everything it depends on (the same plain
    values as before the typed config, so existing cache entries stay valid)."""
    return content_sha256([fingerprint, steps, guidance, cfg.scheduler, n_prompts, cfg.seed_offset,
                           list(cfg.count_weights), cfg.batch_size])


def run(cfg: BenchDistillConfig, training_seeds: Mapping[str, list[str]] | None = None) -> dict:
    """Every run of ``cfg.runs`` at every guidance; ``training_seeds``: run -> its training-seed
    replicates (runs of ``cfg.runs`` too; ``distilled_runs``)."""
    seed_runs(training_seeds)  # a bad training_seeds fails here, not after hours of generation
    replicates = {n for reps in (training_seeds or {}).values() for n in reps}
    unknown = sorted(replicates - set(cfg.runs))
    if unknown:
        raise ValueError(f"bench_distill: training_seeds names run(s) not in runs: {', '.join(unknown)}")
    for spec in cfg.runs.values():  # a model that is not there yet is named before any work starts
        if not (Path(spec.model) / "model_index.json").is_file():
            raise ValueError(f"bench_distill: model {spec.model} not found (run its distill stage first)")
    torch.manual_seed(0)
    clip = load_clip_backbone(cfg.clip_dir)
    checker = load_attribute_checker(cfg.attributes_dir)
    scorer = MetricScorer(ScoringConfig(batch_size=256), clip=clip, checker=checker)
    specs, prompts = held_out_scenes(cfg.prompts, cfg.seed_offset, count_weights=cfg.count_weights)
    truth = rendered(specs)
    # FD floor: other rendered scenes against the ground truth (what a perfect model would score).
    fd_floor = scorer.frechet_distance(truth, rendered(held_out_scenes(
        len(prompts), cfg.seed_offset + 5_000_000, count_weights=cfg.count_weights)[0]))[FD]

    # One model in memory at a time, loaded when its first run starts (in the order of ``runs``).
    loaded: dict[str, object] = {}

    def pipe_for(model: str):
        if model not in loaded:
            loaded.clear()
            loaded[model] = load_pipeline(model)
        return loaded[model]

    reference = cfg.runs.get("teacher_50", next(iter(cfg.runs.values()))).model
    target_guidance = float(pipe_for(reference).config.default_guidance_scale if cfg.guidance is None
                            else cfg.guidance)
    guidances = sorted(set(cfg.guidance_scales) | {target_guidance})
    grid_n = min(cfg.grid_prompts, len(prompts))
    # Each finished (run, guidance) result is kept under cache_dir, keyed by everything it depends
    # on, so an interrupted benchmark resumes where it stopped.
    cache_dir = Path(cfg.cache_dir)

    results: dict[str, dict[str, dict]] = {}
    per_prompt: dict[str, dict[str, dict]] = {}  # run -> guidance -> metric -> values (cache entries since 12/2026)
    grid_columns: dict[str, list] = {}
    start = time.time()
    for name, spec in cfg.runs.items():
        steps = spec.steps
        fingerprint = unet_fingerprint(spec.model)
        results[name] = {}
        for g in guidances:
            key = result_key(fingerprint, steps, g, len(prompts), cfg)
            cached = cache_dir / f"{name}_w{g:g}_{key}.json"
            if cached.is_file():
                r = results[name][str(g)] = json.loads(cached.read_text())
                if "per_prompt" in r:
                    per_prompt.setdefault(name, {})[str(g)] = r.pop("per_prompt")
                if g == target_guidance and name not in replicates:  # the sample grid's images again
                    images = generate(pipe_for(spec.model), prompts[:grid_n], steps, g, cfg.scheduler,
                                      grid_n, f"{name} w={g} (grid)")[0]
                    grid_columns[name] = pipe_for(spec.model).to_output(images * 2 - 1, "pil")
                print(f"[{name} w={g}] resumed from {cached}", flush=True)
                continue
            pipe = pipe_for(spec.model)
            images, seconds, nfe = generate(pipe, prompts, steps, g, cfg.scheduler, cfg.batch_size,
                                            f"{name} w={g}")
            values = scorer.score(images, prompts=prompts)
            r = results[name][str(g)] = {
                "fd": scorer.frechet_distance(truth, images)[FD],
                "clipt": float(np.nanmean(values[CLIPT])),
                "attr_acc": float(np.nanmean(values[ATTR])),
                "nfe": nfe,
                "gflops_per_image": round(nfe * pipe.unet_gflops(g), 3),
                "seconds_per_image": seconds,
            }
            scores = {"attr_acc": np.asarray(values[ATTR], dtype=float).tolist(),
                      "clipt": np.asarray(values[CLIPT], dtype=float).tolist()}
            atomic_write_json(cached, {**r, "per_prompt": scores})
            per_prompt.setdefault(name, {})[str(g)] = scores
            if g == target_guidance and name not in replicates:
                grid_columns[name] = pipe.to_output(images[:grid_n] * 2 - 1, "pil")
            print(f"[{name} w={g}] fd={r['fd']:.4f} clipt={r['clipt']:.4f} attr_acc={r['attr_acc']:.3f} "
                  f"nfe={nfe:g} s/img={seconds:.4f}", flush=True)

    report = {
        "prompts": len(prompts),
        "seed_offset": cfg.seed_offset,
        "scheduler": cfg.scheduler,
        "guidance_scales": guidances,
        "target_guidance": target_guidance,
        "metrics": {"fd": FD + " against the rendered ground truth", "clipt": CLIPT, "attr_acc": ATTR},
        "fd_floor_rendered_vs_rendered": fd_floor,
        "runs": {name: {"model": s.model, "steps": s.steps} for name, s in cfg.runs.items()},
        "results": results,
        "targets": check_targets(results, str(target_guidance), cfg.targets, training_seeds, per_prompt),
        # The same targets at every guidance scale of the sweep (the headline is the target guidance).
        "targets_by_guidance": {str(g): {name: {k: t[k] for k in ("measured", "limit", "met", "training_seeds") if k in t}
                                         for name, t in check_targets(results, str(g), cfg.targets, training_seeds,
                                                                      per_prompt).items()}
                                for g in guidances},
        "training_seeds": training_seed_spread(results, training_seeds),
        "torch_threads": torch.get_num_threads(),
        "batch_size": cfg.batch_size,
        "seconds_total": round(time.time() - start, 1),
    }

    rows = [{"run": n, "guidance": float(g), **r} for n, by_g in results.items() for g, r in by_g.items()]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(cfg.csv_path, buffer.getvalue().encode())
    tradeoff_plot(results, cfg.plot_path, {n: s.steps for n, s in cfg.runs.items()}, training_seeds)
    grid = sample_grid(grid_columns, prompts[:grid_n], [render_scene_array(s) for s in specs[:grid_n]],
                       f"w={target_guidance}")
    atomic_write_bytes(cfg.grid_path, png_bytes(grid))
    return report


@command
def main() -> None:
    from mlops.params import load_config, load_params
    from mlops.tracking import EXPERIMENT, run_tags, tracking_uri

    cfg = load_config("bench_distill", BenchDistillConfig)
    students, training_seeds = distilled_runs(load_params("distill"), load_params("distill_16"),
                                              load_params("distill_8"), load_params("distill_8_variants"))
    clash = sorted(set(students) & set(cfg.runs))
    if clash:
        raise ValueError(f"bench_distill.runs: {', '.join(clash)} come from the distill stages' params; list "
                         "only the teacher runs there")
    cfg = dataclasses.replace(cfg, runs={**cfg.runs, **students})
    report = run(cfg, training_seeds)
    atomic_write_json(cfg.report_path, report)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="bench_distill", tags=run_tags("bench_distill")):
        for name, by_g in report["results"].items():
            for g, r in by_g.items():
                mlflow.log_metrics({f"bench_distill/{name}_w{g}_{k}": v for k, v in r.items()})
        for path in (cfg.report_path, cfg.csv_path, cfg.plot_path, cfg.grid_path):
            mlflow.log_artifact(path)
    print(json.dumps(report["targets"]))


if __name__ == "__main__":
    main()
