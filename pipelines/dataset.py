"""DVC stage ``dataset``: the prompt x step-count x metric table, its plots and its report.

``data/dataset.parquet``, one row per rendered image (a prompt rendered with several seeds,
``render.seeds_per_prompt``, has a row per seed at every step count):

| column | dtype | meaning |
|---|---|---|
| prompt_id | int64 | the prompt's id in data/prompts.parquet |
| prompt | string | the prompt text |
| seed | int64 | the image's generation seed (same at every step count and for its reference) |
| split | string | train / val / test (by prompt, stratified by complexity) |
| complexity | int64 | 1-4: objects in the scene (or word-count quartile for a user's prompt file) |
| steps | int64 | denoising steps of this image |
| is_reference | bool | True for the reference image (steps = the reference count) |
| nfe | int64 | denoising-network evaluations (a CFG pair batched in one call counts once) |
| knee_steps | int64 | the knee step of the prompt with this seed (below; the same at every step count) |
| pixel/psnr ... domain/attr_acc | float64 | every metric, named as ``budgetdiff.metrics`` names it |

Reference rows carry the metrics that need no reference (``pixel/lsnr``, ``high/clipt_*``,
``domain/attr_acc``); their reference-based metrics are NaN.

**Knee step.** For each prompt (and seed) and each grid step count s, the quality of the image relative to
its reference on each level is Q_pixel(s) = SSIM, Q_mid(s) = 1 - LPIPS, Q_high(s) = I-CLIP
(each is 1 for the reference itself; ``knee.metrics`` names them and whether each is a similarity
or a distance). The knee step is the smallest grid step count s such that min over levels of
Q(s') >= q for s and every larger grid count s' (once reached it stays reached), with
q = ``knee.quality`` (default 0.9): the fewest steps whose image is within 10 % of the reference
on every level. A prompt that never gets there on the grid gets the reference step count and is
counted as "not reached": its 100-step image differs from all of its <= 50-step ones (DDIM
lands in another mode late), which is itself a per-prompt fact a budget predictor must learn.
A level whose metric stays close to 1 throughout (LPIPS with a randomly initialised trunk
varies by a few hundredths) never binds. This is the per-prompt oracle of BudgetFusion's
quality-target rule; its spread is what a per-prompt budget can exploit.

Plots (declared at the end of dvc.yaml, rendered by ``dvc plots show``): ``curves/<metric>.csv``
(mean metric vs steps, one column per complexity level), ``knee_histogram.csv`` (prompts per
knee step) and a PNG with all of them. reports/dataset.json: rows, prompts, metric names, the
knee spread and, with
several seeds per prompt, ``seed_agreement``: per knee metric and step count, the correlation
across prompts between two seeds of the same prompt (how much the prompt, rather than the seed,
decides the curve).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from budgetdiff.io import atomic_write_bytes, atomic_write_json
from mlops.cli import command
from pipelines.schema import RECORD_COLUMNS, SPLITS, write_parquet

PROMPT_COLUMNS = ("prompt_id", "prompt", "seed", "split", "complexity")
KIND_SIGN = {"similarity": 1.0, "distance": -1.0}


@dataclass(frozen=True)
class KneeConfig:
    """params.yaml ``dataset.knee``: the knee rule (module docstring)."""

    quality: float
    metrics: dict[str, Literal["similarity", "distance"]]  # metric name prefix -> its kind, one per level


@dataclass(frozen=True)
class DatasetConfig:
    """params.yaml ``dataset``."""

    prompts: str
    scores: str
    render_report: str
    knee: KneeConfig
    output: str
    plots_dir: str
    figure_path: str
    report_path: str


def build_table(prompts: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """Prompts joined to their images' records and metrics (knee column not yet added); each
    image's seed is the one it was rendered with (the scores' column)."""
    columns = [c for c in PROMPT_COLUMNS if c != "seed"]
    table = prompts[columns].merge(scores, on="prompt_id", how="inner", validate="one_to_many")
    if table["prompt_id"].nunique() != len(prompts):
        raise ValueError(f"dataset: scores cover {table['prompt_id'].nunique()} of {len(prompts)} prompts "
                         "(rerun render and score)")
    metrics = [c for c in scores.columns if c not in RECORD_COLUMNS]
    columns = [*PROMPT_COLUMNS, *[c for c in RECORD_COLUMNS if c not in PROMPT_COLUMNS], *metrics]
    table = table[columns].astype({"prompt": "string", "split": "string", "seed": "int64", "complexity": "int64",
                                   "steps": "int64", "nfe": "int64", "is_reference": "bool"})
    return table.sort_values(["prompt_id", "seed", "steps"], ignore_index=True)


def metric_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if "/" in c]


def resolve_knee_metrics(table: pd.DataFrame, spec: dict[str, str]) -> dict[str, str]:
    """{column: "similarity"|"distance"} for each ``knee.metrics`` prefix (e.g. ``mid/lpips``
    matches ``mid/lpips_alex_randinit``)."""
    out = {}
    for prefix, kind in spec.items():
        if kind not in KIND_SIGN:
            raise ValueError(f"dataset.knee.metrics: {prefix!r} must be 'similarity' or 'distance', got {kind!r}")
        matches = [c for c in metric_columns(table) if c == prefix or c.startswith(prefix + "_")]
        if not matches:
            raise ValueError(f"dataset.knee.metrics: no metric column matches {prefix!r} "
                             f"(columns: {', '.join(metric_columns(table))})")
        out[matches[0]] = kind
    return out


def knee_steps(table: pd.DataFrame, metrics: dict[str, str], quality: float, reference_steps: int) -> pd.Series:
    """Each image series' knee step (module docstring), indexed by prompt_id, or by (prompt_id,
    seed) when the table has a seed column (a prompt rendered with several seeds has a knee per seed)."""
    keys = ["prompt_id", "seed"] if "seed" in table.columns else ["prompt_id"]
    grid = table[~table["is_reference"]]
    q = pd.DataFrame({m: (grid[m] if kind == "similarity" else 1.0 - grid[m]) for m, kind in metrics.items()})
    reached = (q.min(axis=1) >= quality).to_numpy()
    frame = pd.DataFrame({**{k: grid[k].to_numpy() for k in keys}, "steps": grid["steps"].to_numpy(),
                          "reached": reached}).sort_values([*keys, "steps"])
    out = {}
    for key, rows in frame.groupby(keys if len(keys) > 1 else keys[0], sort=True):
        steps, ok = rows["steps"].to_numpy(), rows["reached"].to_numpy()
        # Suffix "all reached": the knee is the first step count from which every count is reached.
        stays = np.flip(np.logical_and.accumulate(np.flip(ok)))
        out[key] = int(steps[np.argmax(stays)]) if stays.any() else int(reference_steps)
    series = pd.Series(out, name="knee_steps", dtype="int64")
    if len(keys) > 1:
        series.index = pd.MultiIndex.from_tuples(list(out), names=keys)
    return series


def seed_agreement(table: pd.DataFrame, metrics: list[str]) -> dict | None:
    """How much of a prompt's curve its words decide: across prompts, the Pearson correlation of a
    metric between two seeds of the same prompt at each grid step count (averaged over every pair
    of the prompt's seeds, ordered by seed). 1: the seed does not matter, so one seed gives the
    prompt's curve; 0: the seed alone decides. None with one seed per prompt."""
    grid = table[~table["is_reference"]].sort_values(["prompt_id", "seed"])
    seeds = grid.groupby("prompt_id")["seed"].nunique()
    if seeds.min() < 2:
        return None
    n = int(seeds.min())
    rank = grid.groupby(["prompt_id", "steps"]).cumcount()
    steps = [int(s) for s in sorted(grid["steps"].unique())]
    out = {}
    for m in metrics:
        wide = grid.assign(rank=rank).pivot_table(index="prompt_id", columns=["steps", "rank"], values=m)
        corr = []
        for s in steps:
            r = [np.corrcoef(wide[(s, a)], wide[(s, b)])[0, 1] for a in range(n) for b in range(a + 1, n)]
            corr.append(round(float(np.nanmean(r)), 3))
        out[m] = {"steps": steps, "correlation": corr, "mean": round(float(np.nanmean(corr)), 3)}
    return out


def slug(metric: str) -> str:
    """File stem for a metric's curve: level and family without the backend
    (``mid/lpips_alex_randinit`` -> ``mid_lpips``, ``domain/attr_acc`` -> ``domain_attr``)."""
    level, name = metric.split("/", 1)
    return f"{level}_{name.split('_')[0]}"


def curves(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{metric: DataFrame(steps, complexity_1.., all)} of mean metric per grid step count."""
    grid = table[~table["is_reference"]]
    out = {}
    for m in metric_columns(table):
        wide = grid.pivot_table(index="steps", columns="complexity", values=m, aggfunc="mean")
        wide.columns = [f"complexity_{c}" for c in wide.columns]
        wide["all"] = grid.groupby("steps")[m].mean()
        out[m] = wide.reset_index().round(6)
    return out


def knee_histogram(knees: pd.Series, complexity: pd.Series, step_grid: list[int], reference_steps: int) -> pd.DataFrame:
    """Prompts (prompt-seed pairs, with several seeds per prompt) per knee step, all and per
    complexity level; labels sort as numbers."""
    labels = {s: f"{s:03d}" for s in step_grid}
    labels[reference_steps] = f"not reached by {max(step_grid)}"
    frame = pd.DataFrame({"knee": knees, "complexity": complexity.reindex(knees.index)})
    rows = []
    for s, label in labels.items():
        at = frame[frame["knee"] == s]
        row = {"knee_steps": label, "prompts": int(len(at))}
        row.update({f"complexity_{c}": int((at["complexity"] == c).sum())
                    for c in sorted(frame["complexity"].unique())})
        rows.append(row)
    return pd.DataFrame(rows)


def knee_spread(knees: pd.Series, complexity: pd.Series, step_grid: list[int], reference_steps: int) -> dict:
    values = knees.to_numpy()
    reached = values[values != reference_steps]
    pct = lambda p: float(np.percentile(values, p))  # noqa: E731
    reached_stats = ({"median": float(np.median(reached)), "p25": float(np.percentile(reached, 25)),
                      "p75": float(np.percentile(reached, 75))} if len(reached) else {})
    return {
        "percentiles_count_not_reached_as": int(reference_steps),
        "min": int(values.min()), "p10": pct(10), "p25": pct(25), "median": pct(50), "p75": pct(75),
        "p90": pct(90), "max": int(values.max()), "iqr": pct(75) - pct(25), "std": round(float(values.std()), 3),
        "distinct_values": int(len(np.unique(values))),
        "not_reached_fraction": round(1.0 - len(reached) / len(values), 4),
        "reached_only": reached_stats,
        "histogram": {str(s): int((values == s).sum()) for s in [*step_grid, reference_steps]},
        "median_by_complexity": {str(c): float(np.median(values[complexity.reindex(knees.index).to_numpy() == c]))
                                 for c in sorted(complexity.unique())},
        "mean_by_complexity": {str(c): round(float(values[complexity.reindex(knees.index).to_numpy() == c].mean()), 3)
                               for c in sorted(complexity.unique())},
    }


def figure(curve_tables: dict[str, pd.DataFrame], table: pd.DataFrame, histogram: pd.DataFrame,
           knee_text: str, agreement: dict | None = None) -> bytes:
    """A PNG: one panel per metric (mean vs steps per complexity level; the reference's own
    value dashed where it has one), the knee-step histogram stacked by complexity and, with
    several seeds per prompt, the seed agreement of the knee metrics (``seed_agreement``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(curve_tables) + 1 + (agreement is not None)
    cols = 4
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    refs = table[table["is_reference"]]
    levels = [c for c in next(iter(curve_tables.values())).columns if c.startswith("complexity_")]
    colours = plt.cm.viridis(np.linspace(0.05, 0.85, len(levels)))
    for ax, (metric, frame) in zip(axes.flat, curve_tables.items()):
        for level, colour in zip(levels, colours):
            ax.plot(frame["steps"], frame[level], marker="o", ms=3, color=colour, label=level.replace("_", " "))
            ref = refs.loc[refs["complexity"] == int(level.split("_")[1]), metric].mean()
            if np.isfinite(ref):
                ax.axhline(ref, color=colour, ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(frame["steps"], [str(s) for s in frame["steps"]], fontsize=7)
        ax.minorticks_off()
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("steps", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    ax = axes.flat[len(curve_tables)]
    bottom = np.zeros(len(histogram))
    labels = [label.lstrip("0") for label in histogram["knee_steps"]]
    for level, colour in zip(levels, colours):
        ax.bar(labels, histogram[level], bottom=bottom, color=colour, label=level.replace("_", " "))
        bottom += histogram[level].to_numpy()
    per = "prompt and seed" if agreement is not None else "prompt"
    ax.set_title(f"knee step per {per} ({knee_text})", fontsize=8)
    ax.set_xlabel("knee steps", fontsize=8)
    ax.set_ylabel("prompts" if agreement is None else "prompt-seed pairs", fontsize=8)
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    if agreement is not None:
        ax = axes.flat[len(curve_tables) + 1]
        for metric, values in agreement.items():
            steps = values["steps"]
            ax.plot(steps, values["correlation"], marker="o", ms=3,
                    label=f"{metric.split('_')[0]} (mean {values['mean']:.2f})")
        ax.set_xscale("log")
        ax.set_xticks(steps, [str(k) for k in steps], fontsize=7)
        ax.minorticks_off()
        ax.set_ylim(0, 1)
        ax.set_title("seed agreement: two seeds' metric, corr. across prompts", fontsize=8)
        ax.set_xlabel("steps", fontsize=8)
        ax.legend(fontsize=7)
    for extra in list(axes.flat)[panels:]:
        extra.axis("off")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write_bytes(path, frame.to_csv(index=False).encode())


def run(cfg: DatasetConfig) -> dict:
    prompts = pd.read_parquet(cfg.prompts)
    try:
        scores = pd.read_parquet(cfg.scores)
    except FileNotFoundError:
        raise ValueError(f"dataset.scores: {cfg.scores} does not exist (run the score stage)") from None
    render = json.loads(Path(cfg.render_report).read_text())
    step_grid, reference_steps = list(render["step_grid"]), int(render["reference_steps"])
    table = build_table(prompts, scores)

    quality = cfg.knee.quality
    if not 0 < quality <= 1:
        raise ValueError(f"dataset.knee.quality: must be in (0, 1], got {quality}")
    knee_metrics = resolve_knee_metrics(table, cfg.knee.metrics)
    knees = knee_steps(table, knee_metrics, quality, reference_steps)
    metrics = metric_columns(table)
    table["knee_steps"] = knees.reindex(pd.MultiIndex.from_frame(table[["prompt_id", "seed"]])).to_numpy(np.int64)
    table = table[[c for c in table.columns if c not in metrics] + metrics]
    write_parquet(table, cfg.output)

    # Plots: CSVs for `dvc plots show` and one PNG.
    plots = Path(cfg.plots_dir)
    curve_tables = curves(table)
    for metric, frame in curve_tables.items():
        write_csv(frame, plots / "curves" / f"{slug(metric)}.csv")
    # One knee per (prompt, seed): each counts once, with its prompt's complexity.
    complexity = pd.Series(prompts.set_index("prompt_id")["complexity"].reindex(
        knees.index.get_level_values("prompt_id")).to_numpy(), index=knees.index)
    histogram = knee_histogram(knees, complexity, step_grid, reference_steps)
    write_csv(histogram, plots / "knee_histogram.csv")
    knee_text = f"q = {quality}: " + ", ".join(
        f"{'1 - ' if k == 'distance' else ''}{m.split('/')[1].split('_')[0]}" for m, k in knee_metrics.items())
    agreement = seed_agreement(table, list(knee_metrics))
    atomic_write_bytes(cfg.figure_path, figure(curve_tables, table, histogram, knee_text, agreement))

    per_prompt = table.drop_duplicates("prompt_id")
    report = {
        "rows": int(len(table)),
        "prompts": int(len(per_prompt)),
        "seeds_per_prompt": int(table.groupby("prompt_id")["seed"].nunique().max()),
        "images_per_prompt": int(len(table) // max(1, len(per_prompt))),
        "per_split": {s: int((per_prompt["split"] == s).sum()) for s in SPLITS},
        "per_complexity": {str(k): int(v) for k, v in per_prompt["complexity"].value_counts().sort_index().items()},
        "step_grid": step_grid, "reference_steps": reference_steps,
        "model": render["model"], "scheduler": render["scheduler"], "guidance": render["guidance"],
        "columns": {c: str(t) for c, t in table.dtypes.items()},
        "metrics": metrics,
        "knee": {
            "definition": ("smallest grid step count s such that, at s and every larger grid count, "
                           "min over levels of quality >= q; quality = the metric for a similarity, "
                           "1 - metric for a distance; the reference step count when never reached"),
            "quality": quality, "metrics": knee_metrics, **knee_spread(knees, complexity, step_grid, reference_steps),
        },
        "seed_agreement": agreement,
        "mean_metric_at_steps": {m: {str(int(s)): round(float(v), 5)
                                     for s, v in frame.set_index("steps")["all"].items()}
                                 for m, frame in curve_tables.items()},
    }
    atomic_write_json(cfg.report_path, report)
    return report


def log_to_mlflow(cfg: DatasetConfig, report: dict) -> None:
    """One MLflow run for the stage: the knee params, the headline numbers, report and figure."""
    import mlflow

    from mlops.tracking import EXPERIMENT, run_tags, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="dataset", tags=run_tags("dataset")):
        mlflow.log_params({"knee_quality": report["knee"]["quality"], "step_grid": report["step_grid"],
                           "reference_steps": report["reference_steps"], "model": report["model"]})
        knee = report["knee"]
        metrics = {"dataset/rows": report["rows"], "dataset/prompts": report["prompts"],
                   "dataset/knee_median": knee["median"], "dataset/knee_iqr": knee["iqr"],
                   "dataset/knee_not_reached_fraction": knee["not_reached_fraction"]}
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(cfg.report_path)
        mlflow.log_artifact(cfg.figure_path)


@command
def main() -> None:
    from mlops.params import load_config

    cfg = load_config("dataset", DatasetConfig)
    report = run(cfg)
    log_to_mlflow(cfg, report)
    k = report["knee"]
    print(f"dataset: {report['rows']} rows, {report['prompts']} prompts, {len(report['metrics'])} metrics -> "
          f"{cfg.output}; knee steps median {k['median']:g} (IQR {k['p25']:g}-{k['p75']:g}, "
          f"{k['not_reached_fraction']:.0%} not reached)")


if __name__ == "__main__":
    main()
