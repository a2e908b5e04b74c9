"""Benchmark stage ``bench_budget``: does choosing each prompt's step count before generating
(BudgetFusion) save steps without losing quality, and does it beat giving every prompt the same?

Everything is judged on the dataset's held-out ``split`` (test) prompts, against their rendered
ground truth: the dataset holds every prompt's image metrics at every grid step count, so the
realised quality of any step choice is looked up, not re-rendered. A prompt rendered with several
seeds (``render.seeds_per_prompt``) counts with its mean over them: the quality an allocation
realises on average over seeds, and the curve the oracle knows (``training.budget.CurveTable``).
Reported (reports/budget.json):

- **Predictor error**: MAE per metric and step count, in the metric's own units, for the BiLSTM
  (models/budget), the pooled-embedding MLP ablation (models/budget/mlp) and the train-mean curve
  (a predictor that ignores the prompt).
- **Allocations**: for each predictor and each rule setting (plateau at several ε, the model's
  default among them; quality target at several q): mean chosen steps, % saved against
  ``full_steps`` (50), and per level the realised quality at the chosen steps as a fraction of the
  reference (``budgetdiff.methods.budget.quality_fraction``: SSIM, 1 − LPIPS, I-CLIP) against the
  ``full_steps`` images (drop in %) and the reference; every metric's realised mean besides.
- **Uniform at equal mean steps** (BudgetFusion's baseline): every prompt gets the same count m =
  the allocation's mean steps. m is rarely a grid count, so the uniform quality is interpolated
  linearly between the two neighbouring grid counts s_lo <= m <= s_hi, which is exactly the
  quality of giving a fraction (m − s_lo)/(s_hi − s_lo) of the prompts s_hi steps and the rest
  s_lo (mean steps m). Also reported: uniform rounded up to s_hi (more steps than adaptive).
- **Uncertainty**: with ``bootstrap`` resamples of the prompts, each margin over uniform gets a
  95 % percentile interval and the fraction of resamples at or below zero.
- **Cross-validation** (``cross_validation``): ``train_budget``'s recipe re-run in k folds over
  every prompt of the dataset (fold k tests, fold k + 1 validates, the rest trains), so that the
  allocation and the targets also rest on all the prompts rather than the test split's few;
  repeated over ``repeats`` random fold assignments, judged together, with each repeat's margins.
- **Regret against the oracle**: the same rule applied to each prompt's true curves: extra and
  missing steps against it, and for the quality target the fraction of prompts whose realised
  quality meets q on every level.
- **Prediction cost**: milliseconds per prompt (encode with the model's text encoder + network +
  rule, one prompt at a time) and as % of one generation at the chosen steps, timed with the model
  in this process with the dataset's scheduler and guidance.

Targets (pass/fail, for the BiLSTM at the headline rule): at least ``min_steps_saved_pct`` (50 %)
of the steps saved against ``full_steps`` at no more than ``max_drop_pct`` (2 %) drop on each
level; adaptive beats uniform at equal mean steps on every level.

Writes reports/budget.json, reports/budget.png and reports/budget_tradeoff.csv.
"""

from __future__ import annotations

import io
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import pandas as pd
import torch

from budgetdiff.methods.budget import (
    ABLATION_SUBDIR,
    BudgetModelError,
    BudgetPredictor,
    MetricCurves,
    PlateauRule,
    QualityTargetRule,
    choose_steps,
    load_budget_predictor,
)
from budgetdiff.io import atomic_write_bytes, atomic_write_json
from mlops.cli import command
from training.budget import (
    CurveTable,
    TrainBudgetConfig,
    cross_validate,
    dataset_curves,
    embed_prompts,
    level_quality,
    load_text_encoder,
    mae_by_metric,
    predict_z,
)



@dataclass(frozen=True)
class BudgetTargets:
    min_steps_saved_pct: float
    max_drop_pct: float


@dataclass(frozen=True)
class CrossValidation:
    """``folds`` folds, drawn ``repeats`` times (seeds ``seed`` .. ``seed + repeats - 1``)."""

    folds: int
    seed: int = 0
    repeats: int = 1


@dataclass(frozen=True)
class BenchBudgetConfig:
    """The ``bench_budget`` section of params.yaml."""

    dataset: str
    model: str
    budget_model: str
    split: Literal["train", "val", "test"]  # pipelines.schema.SPLITS
    full_steps: int
    plateau_epsilons: list[float]
    quality_targets: list[float]
    headline_rule: Union[Literal["plateau"], float]
    targets: BudgetTargets
    timing_prompts: int
    timing_repeats: int
    report_path: str
    plot_path: str
    csv_path: str
    bootstrap: int = 0
    cross_validation: Optional[CrossValidation] = None


# ------------------------------------------------------------------------------------------------
# Curves
# ------------------------------------------------------------------------------------------------
def true_curves(curves: CurveTable, rows: np.ndarray, predictor: BudgetPredictor) -> list[MetricCurves]:
    """Each prompt's rendered curves in the predictor's metric order: the oracle's input."""
    idx = [curves.metrics.index(m) for m in predictor.metrics]
    scale = dict(zip(predictor.metrics, map(float, predictor.normalizer.std)))
    out = []
    for r in rows:
        v = curves.values[r][idx]
        reference = {m: float(v[i, -1]) for i, m in enumerate(predictor.metrics) if np.isfinite(v[i, -1])}
        out.append(MetricCurves(curves.step_grid, {m: v[i, :-1] for i, m in enumerate(predictor.metrics)},
                                predictor.rule_metrics, reference, scale))
    return out


def rules_to_run(cfg: BenchBudgetConfig, predictor: BudgetPredictor) -> dict[str, PlateauRule | QualityTargetRule]:
    default_eps = predictor.config["rules"]["plateau_epsilon"]
    cap = predictor.config["rules"]["psnr_cap_db"]
    epsilons = sorted(set(cfg.plateau_epsilons) | {float(default_eps)})
    rules = {f"plateau_eps={e:g}": PlateauRule(e) for e in epsilons}
    rules.update({f"quality_q={q:g}": QualityTargetRule(q, cap) for q in cfg.quality_targets})
    return rules


def headline_name(cfg: BenchBudgetConfig, predictor: BudgetPredictor) -> str:
    rule = cfg.headline_rule
    if rule == "plateau":
        return f"plateau_eps={predictor.config['rules']['plateau_epsilon']:g}"
    return f"quality_q={float(rule):g}"


# ------------------------------------------------------------------------------------------------
# Allocations
# ------------------------------------------------------------------------------------------------
def margin_bootstrap(steps: np.ndarray, quality: dict, grid: list[int], resamples: int, seed: int = 0) -> dict:
    """Per level, a 95 % percentile interval of the margin over uniform at equal mean steps (both
    recomputed on prompts resampled with replacement: the allocation's mean steps, so the uniform
    point, moves with the resample) and the fraction of resamples whose margin is <= 0.

    ``steps``: (n,), or (R, n) for R allocations of the same n prompts (repeated cross-validation);
    a resample then draws prompts, each with all R of its allocations."""
    rng = np.random.default_rng(seed)
    steps = np.atleast_2d(np.asarray(steps))
    n = steps.shape[1]
    idx = rng.integers(0, n, size=(resamples, n))
    col = np.array([[grid.index(int(s)) for s in row] for row in steps])[:, idx]  # (R, B, n)
    mean_steps = steps[:, idx].mean((0, 2))                                       # (B,)
    out = {}
    for level, q in quality.items():
        qi = q[idx]                                                              # (B, n, G)
        at = np.mean([np.take_along_axis(qi, c[..., None], 2)[..., 0].mean(1) for c in col], axis=0)  # (B,)
        curves = qi.mean(1)                                                      # (B, G)
        uniform = np.array([np.interp(m, grid, c) for m, c in zip(mean_steps, curves)])
        margin = at - uniform
        out[level] = {"ci95": [round(float(np.percentile(margin, 2.5)), 5), round(float(np.percentile(margin, 97.5)), 5)],
                      "fraction_le_0": round(float((margin <= 0).mean()), 4)}
    return out


def allocation(steps: np.ndarray, curves: CurveTable, rows: np.ndarray, quality: dict, full_steps: int,
               metric_names: list[str], bootstrap: int = 0) -> dict:
    """What a per-prompt step allocation realises on the rendered ground truth; with ``bootstrap``
    resamples, each level's margin over uniform also gets its interval (``margin_bootstrap``).
    ``steps``: (n,) for the prompts ``rows`` (aligned with ``quality``'s rows), or (R, n) for R
    allocations of them (repeated cross-validation), judged together: means over all R x n, the
    histogram counts allocations."""
    grid = curves.step_grid
    by_repeat = np.atleast_2d(np.asarray(steps))
    pos = np.tile(np.arange(by_repeat.shape[1]), len(by_repeat))  # each allocation's row in quality / rows
    steps = by_repeat.ravel()
    col = np.array([grid.index(int(s)) for s in steps])
    full = grid.index(full_steps)
    mean_steps = float(steps.mean())
    out = {"mean_steps": round(mean_steps, 3), "median_steps": float(np.median(steps)),
           "steps_saved_pct": round(100 * (1 - mean_steps / full_steps), 2),
           "histogram": {str(s): int((steps == s).sum()) for s in grid if (steps == s).any()}}
    levels = {}
    for level, q in quality.items():
        at = q[pos, col].mean()
        at_full = q[:, full].mean()
        uniform_curve = q.mean(0)
        uniform = float(np.interp(mean_steps, grid, uniform_curve))
        hi = grid[int(np.searchsorted(grid, mean_steps - 1e-9))] if mean_steps <= grid[-1] else grid[-1]
        levels[level] = {
            "quality": round(float(at), 5), "quality_at_full": round(float(at_full), 5),
            "drop_vs_full_pct": round(float(100 * (at_full - at) / at_full), 3),
            "uniform_same_mean_steps": round(uniform, 5), "margin_vs_uniform": round(float(at - uniform), 5),
            "uniform_rounded_up": {"steps": int(hi), "quality": round(float(uniform_curve[grid.index(hi)]), 5)},
        }
    if bootstrap:
        for level, b in margin_bootstrap(by_repeat, quality, grid, bootstrap).items():
            levels[level]["margin_vs_uniform_bootstrap"] = b
    out["levels"] = levels
    out["metrics"] = {m: round(float(np.mean(curves.values[rows[pos], curves.metrics.index(m), col])), 5)
                      for m in metric_names}
    return out


def regret(steps: np.ndarray, oracle: np.ndarray, quality: dict, rule, grid: list[int]) -> dict:
    """The predictor's allocation against the oracle's (the same rule on the true curves): step
    differences, and per level the realised quality the oracle gets beyond the predictor."""
    diff = steps - oracle
    out = {"oracle_mean_steps": round(float(oracle.mean()), 3), "extra_steps_mean": round(float(diff.mean()), 3),
           "abs_steps_error_mean": round(float(np.abs(diff).mean()), 3),
           "fewer_than_oracle_fraction": round(float((diff < 0).mean()), 4),
           "more_than_oracle_fraction": round(float((diff > 0).mean()), 4),
           "exact_fraction": round(float((diff == 0).mean()), 4)}
    col = np.array([grid.index(int(s)) for s in steps])
    ocol = np.array([grid.index(int(s)) for s in oracle])
    n = np.arange(len(steps))
    out["quality_oracle_minus_predicted"] = {lv: round(float(q[n, ocol].mean() - q[n, col].mean()), 5)
                                             for lv, q in quality.items()}
    if isinstance(rule, QualityTargetRule):
        met = np.all([q[n, col] >= rule.q for q in quality.values()], axis=0)
        oracle_met = np.all([q[n, ocol] >= rule.q for q in quality.values()], axis=0)
        out.update(target_met_fraction=round(float(met.mean()), 4),
                   oracle_target_met_fraction=round(float(oracle_met.mean()), 4))
    return out


def targets_for(row: dict, targets: BudgetTargets) -> dict:
    saved = row["steps_saved_pct"]
    drops = {lv: v["drop_vs_full_pct"] for lv, v in row["levels"].items()}
    margins = {lv: v["margin_vs_uniform"] for lv, v in row["levels"].items()}
    saving_ok = saved >= targets.min_steps_saved_pct and all(d <= targets.max_drop_pct for d in drops.values())
    return {"steps_saved_at_quality": {"steps_saved_pct": saved, "drop_vs_full_pct": drops,
                                       "target": f">= {targets.min_steps_saved_pct}% saved at <= "
                                                 f"{targets.max_drop_pct}% drop on every level",
                                       "met": bool(saving_ok)},
            "beats_uniform": {"margin": margins, "target": "adaptive > uniform at equal mean steps on every level",
                              "met": bool(all(m > 0 for m in margins.values()))}}


# ------------------------------------------------------------------------------------------------
# Prediction cost
# ------------------------------------------------------------------------------------------------
def prediction_cost(predictor: BudgetPredictor, pipe, prompts: list[str], rule, repeats: int,
                    scheduler: str | None, guidance: float | None) -> dict:
    """Per prompt, one at a time: prediction (encode + network + rule) ms, and one generation at
    the chosen steps and at the largest grid count, timed in this process."""
    from budgetdiff.methods.budget import text_encoder_of
    from budgetdiff.generation.loading import generate

    encoder, tokenizer, _ = text_encoder_of(pipe)
    predictor.predict(prompts[:1], encoder, tokenizer)  # warm-up
    generate(pipe, prompts[:1], steps=2, guidance=guidance, scheduler=scheduler, progress=False)
    rows = []
    for prompt in prompts:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            curves = predictor.predict([prompt], encoder, tokenizer)[0]
            choice = choose_steps(curves, rule)
            times.append(time.perf_counter() - start)
        predict_ms = 1000 * statistics.median(times)
        gen = {}
        for steps in (choice.steps, predictor.step_grid[-1]):
            start = time.perf_counter()
            generate(pipe, [prompt], steps=steps, guidance=guidance, scheduler=scheduler, progress=False)
            gen[steps] = 1000 * (time.perf_counter() - start)
        rows.append({"steps": choice.steps, "predict_ms": predict_ms, "generate_ms": gen[choice.steps],
                     "generate_full_ms": gen[predictor.step_grid[-1]]})
    med = lambda k: float(np.median([r[k] for r in rows]))  # noqa: E731
    return {"prompts": len(rows), "repeats": repeats, "torch_threads": torch.get_num_threads(),
            "predict_ms_median": round(med("predict_ms"), 3),
            "generate_ms_at_chosen_steps_median": round(med("generate_ms"), 2),
            f"generate_ms_at_{predictor.step_grid[-1]}_steps_median": round(med("generate_full_ms"), 2),
            "predict_pct_of_generation_median": round(float(np.median([100 * r["predict_ms"] / r["generate_ms"]
                                                                       for r in rows])), 3),
            "predict_pct_of_full_generation_median": round(float(np.median(
                [100 * r["predict_ms"] / r["generate_full_ms"] for r in rows])), 3),
            "per_prompt": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}


# ------------------------------------------------------------------------------------------------
# run(cfg)
# ------------------------------------------------------------------------------------------------
def load_predictors(cfg: BenchBudgetConfig, curves: CurveTable) -> dict[str, BudgetPredictor]:
    out = {"bilstm": load_budget_predictor(cfg.budget_model),
           "mlp": load_budget_predictor(Path(cfg.budget_model) / ABLATION_SUBDIR)}
    for p in out.values():
        p.check_step_grid(curves.step_grid, cfg.dataset)
        p.check_model(cfg.model)
        missing = [m for m in p.metrics if m not in curves.metrics]
        if missing:
            raise BudgetModelError(f"budget model {p.path!r} predicts {', '.join(missing)}, which "
                                   f"{cfg.dataset} lacks")
    return out


def cross_validation(cv: CrossValidation, train_cfg: TrainBudgetConfig, table: pd.DataFrame, full_steps: int,
                     targets: BudgetTargets, bootstrap: int = 0) -> dict:
    """``train_budget``'s recipe judged on every prompt of the dataset by k-fold cross-validation
    (``training.budget.cross_validate``): each prompt's steps are chosen by networks trained
    without it, so the allocation and the targets rest on all the prompts, not the test split's few.

    With ``repeats`` R > 1 the k-fold split is drawn R times (seeds ``seed`` .. ``seed`` + R - 1)
    and the R allocations of every prompt are judged together (``allocation`` with (R, n) steps;
    the bootstrap resamples prompts with all their allocations): which prompts share a fold moves
    single-split margins by more than they measure. Each repeat's own margins are kept under
    ``repeats``. ``train_cfg``: the ``train_budget`` config (the recipe's own params, passed to
    ``training.budget.cross_validate``)."""
    t0 = time.time()
    folds, repeats, seed = cv.folds, cv.repeats, cv.seed
    if repeats < 1:
        raise ValueError(f"bench_budget.cross_validation.repeats: needs at least 1, got {repeats}")
    runs = []
    for r in range(repeats):
        def progress(k, n, r=r):
            print(f"bench_budget: cross-validation repeat {r + 1}/{repeats}, fold {k}/{n}", flush=True)
        runs.append(cross_validate(train_cfg, table, folds, seed + r, progress=progress))
    curves, rows, levels = runs[0]["curves"], runs[0]["rows"], runs[0]["levels"]
    if full_steps not in curves.step_grid:
        raise ValueError(f"bench_budget.full_steps: {full_steps} is not a grid step count {curves.step_grid}")
    quality = level_quality(curves, rows, levels, train_cfg.psnr_cap_db)
    points = curves.points
    rule_metrics = list(levels.values())
    out = {"folds": folds, "repeats": repeats, "seeds": [seed + r for r in range(repeats)],
           "prompts": int(len(rows)),
           "prompts_per_fold": [int((runs[0]["fold"] == k).sum()) for k in range(folds)],
           "scheme": "fold k tests, fold k+1 validates (early stopping, plateau ε), the rest trains and normalises",
           "predictor_mae_mean": {}}
    for name in ("bilstm", "mlp", "mean_curve"):
        maes = [mae_by_metric(cv[name]["predicted"], curves.values, curves.metrics, points) for cv in runs]
        out["predictor_mae_mean"][name] = {m: round(float(np.mean([mae[m]["mean"] for mae in maes])), 5)
                                           for m in rule_metrics}
    for arch in ("bilstm", "mlp"):
        steps = np.stack([cv[arch]["steps"] for cv in runs])                       # (R, n)
        row = allocation(steps, curves, rows, quality, full_steps, curves.metrics, bootstrap)
        row["plateau_epsilon_per_fold"] = [cv[arch]["epsilon"] for cv in runs]     # per repeat
        row["targets"] = targets_for(row, targets)
        row["repeats"] = []
        for r in range(repeats):
            beats = targets_for(allocation(steps[r], curves, rows, quality, full_steps, curves.metrics),
                                targets)["beats_uniform"]
            row["repeats"].append({"seed": seed + r, "mean_steps": round(float(steps[r].mean()), 3),
                                   "margin_vs_uniform": beats["margin"], "beats_uniform": beats["met"]})
        row["beats_uniform_repeats"] = f"{sum(x['beats_uniform'] for x in row['repeats'])} of {repeats}"
        out[arch] = row
    out["targets"] = out["bilstm"]["targets"]
    out["seconds"] = round(time.time() - t0, 1)
    return out


def run(cfg: BenchBudgetConfig, train_cfg: TrainBudgetConfig | None = None) -> tuple[dict, list[dict], dict]:
    """The report, the trade-off rows (CSV) and what the plot needs. With ``cfg.cross_validation``
    set, ``train_cfg`` (the ``train_budget`` params) is the recipe cross-validated over every prompt."""
    t_start = time.time()
    try:
        table = pd.read_parquet(cfg.dataset)
    except FileNotFoundError:
        raise ValueError(f"bench_budget.dataset: {cfg.dataset} does not exist (dvc repro dataset)") from None
    curves = dataset_curves(table)
    predictors = load_predictors(cfg, curves)
    main_predictor = predictors["bilstm"]
    full_steps = cfg.full_steps
    if full_steps not in curves.step_grid:
        raise ValueError(f"bench_budget.full_steps: {full_steps} is not a grid step count {curves.step_grid}")
    rows = curves.subset(cfg.split)
    if len(rows) == 0:
        raise ValueError(f"bench_budget.split: split {cfg.split!r} has no prompts in {cfg.dataset}")
    metrics = main_predictor.metrics
    idx = [curves.metrics.index(m) for m in metrics]
    levels = main_predictor.rule_metrics
    cap = main_predictor.config["rules"]["psnr_cap_db"]
    quality = level_quality(curves, rows, levels, cap)
    prompts = [curves.prompts[r] for r in rows]

    pipe, (encoder, tokenizer, _) = load_text_encoder(cfg.model)
    emb = embed_prompts(prompts, encoder, tokenizer, main_predictor.config["max_text_length"])
    everything = np.arange(len(rows))
    z = {name: predict_z(p.network, emb, everything) for name, p in predictors.items()}
    predicted = {name: p.curves_from_normalized(z[name], emb.truncated) for name, p in predictors.items()}
    oracle = true_curves(curves, rows, main_predictor)

    # Predictor error (metric units), with the train-mean curve as the prompt-blind baseline.
    points = curves.points
    true = curves.values[rows][:, idx]
    mean_curve = curves.mean_curve(curves.subset("train"))[idx]
    errors = {}
    for name, p in predictors.items():
        pred = p.normalizer.denormalize(z[name])
        errors[name] = mae_by_metric(pred, true, metrics, points)
    errors["train_mean_curve"] = mae_by_metric(np.broadcast_to(mean_curve, true.shape), true, metrics, points)

    # Allocations per predictor and rule.
    rules = rules_to_run(cfg, main_predictor)
    allocations: dict[str, dict[str, dict]] = {}
    chosen: dict[str, dict[str, np.ndarray]] = {}
    for name, curve_list in {**predicted, "oracle": oracle}.items():
        allocations[name], chosen[name] = {}, {}
        for rule_name, rule in rules.items():
            choices = [choose_steps(c, rule) for c in curve_list]
            steps = np.array([c.steps for c in choices])
            chosen[name][rule_name] = steps
            row = allocation(steps, curves, rows, quality, full_steps, metrics, cfg.bootstrap)
            row["rule_met_on_grid_fraction"] = round(float(np.mean([c.reached for c in choices])), 4)
            allocations[name][rule_name] = row
    for name in predicted:
        for rule_name, rule in rules.items():
            allocations[name][rule_name]["regret_vs_oracle"] = regret(
                chosen[name][rule_name], chosen["oracle"][rule_name], quality, rule, curves.step_grid)
    targets = cfg.targets
    for name in allocations:
        for row in allocations[name].values():
            row["targets"] = targets_for(row, targets)

    headline = headline_name(cfg, main_predictor)
    head = allocations["bilstm"][headline]
    uniform = {"steps": curves.step_grid,
               "quality": {lv: [round(float(x), 5) for x in q.mean(0)] for lv, q in quality.items()},
               "metrics": {m: [round(float(x), 5) for x in np.nanmean(curves.values[rows, curves.metrics.index(m), :-1], 0)]
                           for m in metrics},
               "reference_metrics": {m: round(float(np.nanmean(curves.values[rows, curves.metrics.index(m), -1])), 5)
                                     for m in metrics if np.isfinite(curves.values[rows, curves.metrics.index(m), -1]).any()}}
    # The network evaluations the dataset's own images cost (nfe column) at the chosen and the full counts.
    nfe = table[~table["is_reference"]].pivot_table(index="prompt_id", columns="steps", values="nfe")
    nfe = nfe.reindex(index=curves.prompt_ids[rows], columns=curves.step_grid).to_numpy()
    head_cols = np.array([curves.step_grid.index(int(s)) for s in chosen["bilstm"][headline]])
    render_nfe = {"chosen": round(float(nfe[everything, head_cols].mean()), 5),
                  "full": round(float(nfe[:, curves.step_grid.index(full_steps)].mean()), 5)}
    render_nfe["saved_pct"] = round(100 * (1 - render_nfe["chosen"] / render_nfe["full"]), 2)

    rendered = main_predictor.config.get("rendered_with") or {}
    cost = prediction_cost(main_predictor, pipe, prompts[: cfg.timing_prompts], rules[headline],
                           cfg.timing_repeats, rendered.get("scheduler"), rendered.get("guidance"))

    report = {
        "split": cfg.split, "prompts": int(len(rows)), "step_grid": curves.step_grid,
        "reference_steps": curves.reference_steps, "full_steps": full_steps,
        "model": main_predictor.config["model"], "rendered_with": rendered,
        "seeds_per_prompt": int(curves.seeds.max()),
        "levels": levels, "quality_definition": {
            lv: ("1 - " if m.startswith("mid/lpips") else "") + m + " (fraction of the reference; 1 = the reference)"
            + (f", mean over each prompt's {int(curves.seeds.max())} seeds" if curves.seeds.max() > 1 else "")
            for lv, m in levels.items()},
        "normalization": "z-score per metric over the train split, step counts pooled; distances sign-flipped",
        "uniform_interpolation": "uniform quality at mean m: linear between the neighbouring grid counts, "
                                 "= a mixture of the two counts with mean exactly m",
        "predictor_parameters": {n: int(sum(x.numel() for x in p.network.parameters())) for n, p in predictors.items()},
        "predictor_mae": errors,
        "predictor_mae_mean": {n: {m: round(v[m]["mean"], 5) for m in metrics} for n, v in errors.items()},
        "headline": {"predictor": "bilstm", "rule": headline, **head,
                     "metrics_at_full": {m: uniform["metrics"][m][curves.step_grid.index(full_steps)] for m in metrics},
                     "metrics_at_reference": uniform["reference_metrics"],
                     "render_nfe_per_image_from_dataset": render_nfe},
        "targets": head["targets"],
        "allocations": allocations,
        "uniform": uniform,
        "prediction_cost": cost,
        "prompts_truncated": int(sum(emb.truncated)),
        "seconds_total": round(time.time() - t_start, 1),
    }
    if cfg.cross_validation:
        if train_cfg is None:
            raise ValueError("bench_budget.cross_validation: needs the train_budget params")
        report["cross_validation"] = cross_validation(cfg.cross_validation, train_cfg, table, full_steps,
                                                      targets, cfg.bootstrap)
        report["seconds_total"] = round(time.time() - t_start, 1)
    report["operating_points_meeting_both_targets"] = {
        name: [r for r, row in rows_.items() if all(t["met"] for t in row["targets"].values())]
        for name, rows_ in allocations.items()}

    csv_rows = [{"method": "uniform", "rule": f"steps={s}", "mean_steps": s,
                 **{f"quality_{lv}": round(float(q.mean(0)[j]), 5) for lv, q in quality.items()}}
                for j, s in enumerate(curves.step_grid)]
    csv_rows += [{"method": name, "rule": r, "mean_steps": row["mean_steps"],
                  **{f"quality_{lv}": v["quality"] for lv, v in row["levels"].items()}}
                 for name, rows_ in allocations.items() for r, row in rows_.items()]
    plot_data = {"curves": curves, "rows": rows, "quality": quality, "predicted": predicted, "oracle": oracle,
                 "chosen": chosen, "headline": headline, "errors": errors, "metrics": metrics,
                 "std": dict(zip(metrics, main_predictor.normalizer.std)), "levels": levels}
    return report, csv_rows, plot_data


# ------------------------------------------------------------------------------------------------
# Plot
# ------------------------------------------------------------------------------------------------
def log_steps_axis(ax, grid: list[int]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(grid, [str(s) for s in grid], fontsize=7)
    ax.minorticks_off()


def cv_margin_panel(ax, cv: dict, levels: list[str]) -> None:
    """Cross-validated margin over uniform per level: each repeat (small marks) and all repeats
    together (large, with the bootstrap interval), in units of that interval's half-width where
    there is one (the levels' margins differ by 10x in scale), so |y| < 1 is within the noise."""
    unit = "half the 95 % interval"
    for k, (arch, colour) in enumerate((("bilstm", "tab:blue"), ("mlp", "tab:orange"))):
        row = cv[arch]
        for i, level in enumerate(levels):
            pooled = row["levels"][level]
            ci = pooled.get("margin_vs_uniform_bootstrap", {}).get("ci95")
            scale = (ci[1] - ci[0]) / 2 if ci and ci[1] > ci[0] else 1.0
            if not ci:
                unit = "quality"
            x = i + (k - 0.5) * 0.3
            ax.scatter([x] * len(row["repeats"]), [r["margin_vs_uniform"][level] / scale for r in row["repeats"]],
                       s=10, color=colour, alpha=0.6)
            err = None if not ci else [[(pooled["margin_vs_uniform"] - ci[0]) / scale],
                                       [(ci[1] - pooled["margin_vs_uniform"]) / scale]]
            ax.errorbar([x], [pooled["margin_vs_uniform"] / scale], yerr=err, fmt="D", ms=6, color=colour, capsize=3,
                        label=f"{arch} ({row['beats_uniform_repeats']} repeats beat uniform)" if i == 0 else None)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(levels)), levels, fontsize=8)
    ax.set_ylabel(f"margin vs uniform / {unit}", fontsize=8)
    ax.set_title(f"{cv['repeats']} x {cv['folds']}-fold CV, {cv['prompts']} prompts: margin over uniform", fontsize=9)
    ax.legend(fontsize=6)
    ax.tick_params(labelsize=7)


def figure(report: dict, csv_rows: list[dict], data: dict) -> bytes:
    """Quality vs mean steps per level (uniform curve, adaptive points), predictor error per step
    count, chosen-steps histogram against the oracle, a few predicted vs true curves and, with
    cross-validation, each level's margin over uniform per repeat and pooled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(data["levels"])
    cv = report.get("cross_validation")
    cols = max(3 + bool(cv), len(levels))
    fig, axes = plt.subplots(2, cols, figsize=(4.6 * cols, 7.4), squeeze=False)
    frame = pd.DataFrame(csv_rows)
    styles = {"bilstm": ("tab:blue", "o"), "mlp": ("tab:orange", "s"), "oracle": ("tab:green", "^")}
    for ax, level in zip(axes[0], levels):
        uni = frame[frame["method"] == "uniform"]
        ax.plot(uni["mean_steps"], uni[f"quality_{level}"], "k-", marker=".", label="uniform")
        for method, (colour, marker) in styles.items():
            pts = frame[frame["method"] == method]
            ax.scatter(pts["mean_steps"], pts[f"quality_{level}"], c=colour, marker=marker, s=22, label=method)
        h = report["headline"]
        ax.scatter([h["mean_steps"]], [h["levels"][level]["quality"]], s=120, facecolors="none", edgecolors="red",
                   label=f"headline ({h['rule']})")
        log_steps_axis(ax, data["curves"].step_grid)
        ax.set_xlabel("mean steps per prompt", fontsize=8)
        ax.set_title(f"{level}: {report['quality_definition'][level].split(' (')[0]}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    axes[0][0].set_ylabel("quality (fraction of reference)", fontsize=8)

    grid = data["curves"].step_grid
    ax = axes[1][0]
    for name, colour in (("bilstm", "tab:blue"), ("mlp", "tab:orange"), ("train_mean_curve", "gray")):
        err = [np.mean([data["errors"][name][m].get(str(s), np.nan) / data["std"][m] for m in data["levels"].values()])
               for s in grid]
        ax.plot(grid, err, marker="o", ms=3, color=colour, label=name)
    log_steps_axis(ax, grid)
    ax.set_title("predictor MAE / train std (rule metrics)", fontsize=9)
    ax.set_xlabel("steps", fontsize=8)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)

    ax = axes[1][1]
    head = data["headline"]
    labels = [str(s) for s in grid]
    width = 0.4
    for k, (name, colour) in enumerate((("bilstm", "tab:blue"), ("oracle", "tab:green"))):
        steps = data["chosen"][name][head]
        ax.bar(np.arange(len(grid)) + (k - 0.5) * width, [(steps == s).sum() for s in grid], width, color=colour,
               label=name)
    ax.set_xticks(np.arange(len(grid)), labels, fontsize=7)
    ax.set_title(f"chosen steps ({head})", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[1][2]
    metric = next(iter(data["levels"].values()))
    for k, colour in zip(range(min(4, len(data["rows"]))), plt.cm.tab10.colors):
        ax.plot(grid, data["oracle"][k].values[metric], "-", color=colour, lw=1.2)
        ax.plot(grid, data["predicted"]["bilstm"][k].values[metric], "--", color=colour, lw=1.2)
    log_steps_axis(ax, grid)
    ax.set_title(f"{metric}: true (solid) vs BiLSTM (dashed)", fontsize=9)
    ax.set_xlabel("steps", fontsize=8)
    ax.tick_params(labelsize=7)
    if cv:
        cv_margin_panel(axes[1][3], cv, levels)
    for extra in list(axes[0][len(levels):]) + list(axes[1][3 + bool(cv):]):
        extra.axis("off")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def log_to_mlflow(cfg: BenchBudgetConfig, report: dict) -> None:
    import mlflow

    from mlops.tracking import EXPERIMENT, run_tags, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(EXPERIMENT)
    h = report["headline"]
    with mlflow.start_run(run_name="bench_budget", tags=run_tags("bench_budget")):
        mlflow.log_params({"split": cfg.split, "headline_rule": h["rule"], "full_steps": cfg.full_steps,
                           "prompts": report["prompts"]})
        metrics = {"bench_budget/mean_steps": h["mean_steps"], "bench_budget/steps_saved_pct": h["steps_saved_pct"],
                   "bench_budget/predict_ms": report["prediction_cost"]["predict_ms_median"],
                   "bench_budget/predict_pct_of_generation":
                       report["prediction_cost"]["predict_pct_of_generation_median"]}
        for level, v in h["levels"].items():
            metrics[f"bench_budget/{level}_drop_vs_full_pct"] = v["drop_vs_full_pct"]
            metrics[f"bench_budget/{level}_margin_vs_uniform"] = v["margin_vs_uniform"]
        mlflow.log_metrics(metrics)
        for path in (cfg.report_path, cfg.plot_path, cfg.csv_path):
            mlflow.log_artifact(path)


@command  # BudgetModelError is a ValueError
def main() -> None:
    from mlops.params import load_config

    cfg = load_config("bench_budget", BenchBudgetConfig)
    train_cfg = load_config("train_budget", TrainBudgetConfig) if cfg.cross_validation else None
    report, csv_rows, plot_data = run(cfg, train_cfg)
    atomic_write_json(cfg.report_path, report)
    atomic_write_bytes(cfg.csv_path, pd.DataFrame(csv_rows).to_csv(index=False).encode())
    atomic_write_bytes(cfg.plot_path, figure(report, csv_rows, plot_data))
    log_to_mlflow(cfg, report)
    h = report["headline"]
    print(json.dumps({"rule": h["rule"], "mean_steps": h["mean_steps"], "steps_saved_pct": h["steps_saved_pct"],
                      "drop_vs_full_pct": {lv: v["drop_vs_full_pct"] for lv, v in h["levels"].items()},
                      "margin_vs_uniform": {lv: v["margin_vs_uniform"] for lv, v in h["levels"].items()},
                      "targets_met": {k: v["met"] for k, v in report["targets"].items()},
                      "predict_ms": report["prediction_cost"]["predict_ms_median"],
                      "predict_pct_of_generation": report["prediction_cost"]["predict_pct_of_generation_median"],
                      "seconds_total": report["seconds_total"]}))
    if "cross_validation" in report:
        cv = report["cross_validation"]
        print(json.dumps({"cross_validation": {"prompts": cv["prompts"], "folds": cv["folds"], "repeats": cv["repeats"],
                                               "beats_uniform_repeats": cv["bilstm"]["beats_uniform_repeats"],
                                               "mean_steps": cv["bilstm"]["mean_steps"],
                                               "steps_saved_pct": cv["bilstm"]["steps_saved_pct"],
                                               "drop_vs_full_pct": {lv: v["drop_vs_full_pct"]
                                                                    for lv, v in cv["bilstm"]["levels"].items()},
                                               "margin_vs_uniform": {lv: v["margin_vs_uniform"]
                                                                     for lv, v in cv["bilstm"]["levels"].items()},
                                               "targets_met": {k: v["met"] for k, v in cv["targets"].items()}}}))


if __name__ == "__main__":
    main()
