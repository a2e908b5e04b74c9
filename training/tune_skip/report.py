"""The stage's outputs: the skip policy file, reports/tune_skip.json (with the search ablation's
hypervolumes), the Pareto plot and the MLflow runs."""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from budgetdiff.io import atomic_write_bytes, atomic_write_json

from .search import hypervolume, pareto_front, point_config


def build_policy(steps: int, chosen: dict, source: dict, prompts: int):
    """A ``SkipPolicy`` from the chosen trials of every scheduler."""
    from budgetdiff.methods.adaptive import AdaptiveSkipConfig
    from budgetdiff.methods.policy import OperatingPoint, SchedulerPolicy, SkipPolicy

    def measured(t: dict, lpips_name: str) -> dict:
        m = {"quality": round(t["quality"], 6), "nfe_speedup": round(steps / t["nfe"], 4),
             "mean_nfe": round(t["nfe"], 4), lpips_name: t["lpips"], "measured_on": f"{prompts} tuning prompts",
             "trial": t["trial_id"]}
        for k, v in t.get("levels", {}).items():
            m.setdefault(k, v)
        return m

    schedulers = {}
    for s, sel in chosen.items():
        name_of, points = {}, []

        def add(t: dict, name: str):
            if t["trial_id"] in name_of:
                return name_of[t["trial_id"]]
            c = point_config(t)
            cfg = AdaptiveSkipConfig(threshold=float(c["threshold"]), max_skip=int(c["max_skip"]),
                                     warmup=int(c["warmup"]), reuse=str(c["reuse"]))
            points.append(OperatingPoint(name, cfg, measured(t, sel["lpips_name"])))
            name_of[t["trial_id"]] = name
            return name

        default = add(sel["default"], "default")
        for q, t in sorted(sel["levels"].items(), reverse=True):
            add(t, f"quality>={q:g}")
        schedulers[s] = SchedulerPolicy(default, tuple(points))
    return SkipPolicy(schedulers, source, steps)


def ablation(report: dict) -> None:
    """Hypervolume of each search's front (normalised: NFE / steps, loss / the largest loss any
    search of the scheduler saw, at any seed; reference point (1, 1)), after every trial and at the
    full budget; with replicate seeds, per seed and their mean, and how often Optuna won."""
    steps = report["steps"]
    for s, res in report["schedulers"].items():
        seed0 = str(res["searches"].get("optuna", {}).get("seed", 0))  # the shipped search's
        runs_by_seed = {seed0: res["searches"], **res.get("replicates", {})}
        all_trials = [t for runs in runs_by_seed.values() for r in runs.values() for t in r["trials"]]
        if not all_trials:
            continue
        loss_ref = max(t["lpips"] for t in all_trials) * 1.0001
        out = {"reference_point": {"nfe": steps, "lpips": loss_ref},
               "normalisation": "nfe / steps and lpips / reference lpips; HV of the front below (1, 1)"}

        def summary(r: dict) -> dict:
            pts = [{"nfe": t["nfe"] / steps, "lpips": t["lpips"] / loss_ref} for t in r["trials"]]
            curve = [hypervolume(pts[:k], (1.0, 1.0)) for k in range(1, len(pts) + 1)]
            return {"hypervolume": curve[-1] if curve else 0.0, "hypervolume_by_trial": curve,
                    "trials": len(pts), "wall_seconds": r["wall_seconds"],
                    "front_size": len(pareto_front(r["trials"]))}

        summaries = {seed: {name: summary(r) for name, r in runs.items()} for seed, runs in runs_by_seed.items()}
        out.update(summaries[seed0])
        if "optuna" in out and "random" in out:
            out["optuna_beats_random"] = bool(out["optuna"]["hypervolume"] > out["random"]["hypervolume"])
        if len(runs_by_seed) > 1:
            curves = {seed: {name: sm["hypervolume_by_trial"] for name, sm in runs.items()}
                      for seed, runs in summaries.items()}
            per_seed = {seed: {name: (c[-1] if c else 0.0) for name, c in cs.items()} for seed, cs in curves.items()}
            both = {seed: hv for seed, hv in per_seed.items() if {"optuna", "random"} <= set(hv)}
            agg = {"seeds": sorted(per_seed, key=int), "hypervolume_by_seed": per_seed,
                   "hypervolume_by_trial_by_seed": curves}
            for name in ("optuna", "random"):
                vals = [hv[name] for hv in per_seed.values() if name in hv]
                if vals:
                    agg[name] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1
                                 else 0.0, "n": len(vals)}
            if both:
                diffs = [hv["optuna"] - hv["random"] for hv in both.values()]
                agg["optuna_wins"] = int(sum(d > 0 for d in diffs))
                agg["pairs"] = len(diffs)
                agg["mean_difference"] = float(np.mean(diffs))
                agg["optuna_beats_random"] = bool(np.mean(diffs) > 0)
            out["replicates"] = agg
        res["ablation"] = out


def write_outputs(cfg: dict, report: dict, chosen: dict, t0: float, final: bool = False) -> None:
    from budgetdiff.io import atomic_write_bytes, atomic_write_json

    source = {"stage": "tune_skip", "report": os.path.relpath(cfg["report_path"], Path.cwd()),
              "run_key": report["run_key"], "search": "optuna (TPE, multi-objective)",
              "model": os.path.relpath(cfg["model"], Path.cwd()) if cfg["model"].startswith(str(Path.cwd()))
              else cfg["model"], "guidance": report["guidance"],
              "tuning_prompts": report["tuning_prompts"]["count"],
              "tuning_seed_offset": report["tuning_prompts"]["seed_offset"]}
    policy = build_policy(int(cfg["steps"]), chosen, source, report["tuning_prompts"]["count"])
    policy.save(cfg["policy_path"])
    report["policy"] = {"path": os.path.relpath(cfg["policy_path"], Path.cwd()), "sha256": policy.sha256}
    report["complete"] = bool(final)
    report["seconds_all_phases"] = seconds_all_phases(report)
    report.setdefault("seconds_total", round(time.time() - t0, 1))
    if not final:
        report["seconds_total"] = round(time.time() - t0, 1)
    atomic_write_json(cfg["report_path"], _slim(report))
    atomic_write_bytes(cfg["plot_path"], pareto_plot(report))


def seconds_all_phases(report: dict) -> dict:
    """What the whole tuning cost, whether this run computed a phase or resumed it from a
    checkpoint (``seconds_total`` is this run's wall-clock only): the wall-clock of every search
    and the duration of every reference, confirmation and held-out task. Tasks of different
    schedulers ran side by side, so the sum is task time, not wall-clock."""
    out = {"references": 0.0, "searches": 0.0, "confirmation": 0.0, "holdout": 0.0}
    for res in report.get("schedulers", {}).values():
        out["references"] += float(res.get("reference_seconds") or 0.0)
        runs = [*res.get("searches", {}).values(),
                *(r for rs in res.get("replicates", {}).values() for r in rs.values())]
        out["searches"] += sum(float(r.get("wall_seconds") or 0.0) for r in runs)
        for phase, key in (("confirmation", "confirm"), ("holdout", "holdout")):
            task = res.get(key) or {}
            out[phase] += float(task.get("reference_seconds") or 0.0)
            out[phase] += sum(float(r.get("seconds") or 0.0) for r in (task.get("rows") or {}).values())
    out = {k: round(v, 1) for k, v in out.items()}
    out["total"] = round(sum(out.values()), 1)
    return out


def _slim(report: dict) -> dict:
    """The report without per-trial level dicts duplicated into huge lists (keeps it readable)."""
    out = json.loads(json.dumps(report, default=float))
    for res in out.get("schedulers", {}).values():
        for r in [*res.get("searches", {}).values(),
                  *(x for runs in res.get("replicates", {}).values() for x in runs.values())]:
            r["trials"] = [{k: t[k] for k in ("trial_id", "order", "config", "nfe", "lpips", "quality", "seconds")}
                           for t in r["trials"]]
    return out


def pareto_plot(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-7  # LPIPS can be exactly 0 (no skip): keep such points on the log axis

    def y(v):
        return max(float(v), floor)

    scheds = list(report["schedulers"])
    curves = any(report["schedulers"][s].get("ablation") for s in scheds)
    rows = 2 if curves else 1
    fig, axes = plt.subplots(rows, len(scheds), figsize=(5.2 * len(scheds), 4.4 * rows), squeeze=False)
    steps = report["steps"]
    for ax, s in zip(axes[0], scheds):
        res = report["schedulers"][s]
        colours = {"optuna": "tab:blue", "random": "tab:gray"}
        for name, r in res.get("searches", {}).items():
            ax.scatter([steps / t["nfe"] for t in r["trials"]], [y(t["lpips"]) for t in r["trials"]], s=14,
                       alpha=0.5, color=colours[name], label=f"{name} trials ({len(r['trials'])})")
        front = res.get("pareto_front", [])
        ax.plot([steps / p["nfe"] for p in front], [y(p["lpips"]) for p in front], "-o", color="tab:blue", ms=4,
                label="Optuna Pareto front")
        for name, marker, colour in (("hand", "s", "tab:red"), ("paper", "^", "tab:green")):
            b = res.get("baselines_tuning", {}).get(name)
            if b:
                c = b["config"]
                label = (f"hand-tuned δ={c['threshold']:g}, C_max {c['max_skip']}" if name == "hand"
                         else f"paper default δ={c['threshold']:g}, C_max {c['max_skip']}")
                ax.scatter([steps / b["nfe"]], [y(b["lpips"])], marker=marker, s=70, color=colour, label=label, zorder=5)
        d = res.get("chosen", {}).get("default")
        if d:
            ax.scatter([d["nfe_speedup"]], [y(d["lpips"])], marker="*", s=160, color="black", zorder=6,
                       label=f"chosen default δ={d['threshold']:.3g}, C_max {d['max_skip']}, "
                             f"w {d['warmup']}, {d['reuse']}")
        h = res.get("holdout", {})
        if h.get("rows", {}).get("tuned"):  # hollow: the same two points on the held-out prompts
            t = h["rows"]["tuned"]
            n = (h.get("prompts") or {}).get("count")
            ax.scatter([t["nfe_speedup"]], [y(t["lpips"])], marker="*", s=160, facecolors="none",
                       edgecolors="black", zorder=6, label=f"chosen default, {n} held-out prompts")
            if h.get("hand"):
                ax.scatter([h["hand"]["nfe_speedup"]], [y(h["hand"]["lpips"])], marker="s", s=70,
                           facecolors="none", edgecolors="tab:red", zorder=5,
                           label="hand-tuned, held-out (reports/adaptive.json)")
        if h.get("target"):
            t = h["target"]
            hand = f" (hand {h['hand']['nfe_speedup']:.2f}x)" if h.get("hand") else ""
            ax.set_title(f"{s}: held-out {t['nfe_speedup']:.2f}x{hand}, target met: {t['met']}", fontsize=9)
        else:
            ax.set_title(f"{s} (tuning prompts)", fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("NFE speed-up vs full (×)")
        ax.set_ylabel(f"{report.get('lpips_backend') or 'LPIPS'} vs full-step image")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper left")
    if curves:  # second row: the ablation, hypervolume after each trial (thin: a seed; thick: the mean)
        for ax, s in zip(axes[1], scheds):
            ab = report["schedulers"][s].get("ablation") or {}
            by_seed = (ab.get("replicates") or {}).get("hypervolume_by_trial_by_seed") or {
                "0": {n: ab[n]["hypervolume_by_trial"] for n in ("optuna", "random") if n in ab}}
            title = []
            for name, colour in (("optuna", "tab:blue"), ("random", "tab:gray")):
                runs = [c[name] for c in by_seed.values() if c.get(name)]
                if not runs:
                    continue
                for c in runs:
                    ax.plot(range(1, len(c) + 1), c, color=colour, lw=0.8, alpha=0.4)
                n = min(len(c) for c in runs)
                mean = np.mean([c[:n] for c in runs], axis=0)
                ax.plot(range(1, n + 1), mean, color=colour, lw=2.2,
                        label=f"{name}: mean of {len(runs)} seed(s), final {mean[-1]:.3f}")
                title.append(f"{name} {mean[-1]:.3f}")
            rep = ab.get("replicates") or {}
            wins = f"; Optuna larger in {rep['optuna_wins']}/{rep['pairs']} seeds" if rep.get("pairs") else ""
            ax.set_title(f"{s}: hypervolume by trial\n{', '.join(title)}{wins}", fontsize=9)
            ax.set_xlabel("trials")
            ax.set_ylabel("hypervolume (normalised NFE, LPIPS)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"tune_skip: Pareto fronts on {report['tuning_prompts']['count']} tuning prompts, "
                 f"{steps} steps, guidance {report['guidance']:g}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def log_mlflow(cfg: dict, report: dict) -> str:
    """One parent run and one child run per trial (``mlflow.parentRunId``), logged from the
    driver after the tuning. Returns the parent run id."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from mlops.tracking import EXPERIMENT, run_tags, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.set_experiment(EXPERIMENT)
    client = MlflowClient()
    tags = run_tags("tune_skip")
    with mlflow.start_run(run_name="tune_skip", tags=tags) as parent:
        pid = parent.info.run_id
        mlflow.log_params({"model": cfg["model"], "steps": cfg["steps"], "guidance": report["guidance"],
                           "num_samples": cfg["num_samples"], "seed": cfg.get("seed", 0),
                           "tuning_prompts": report["tuning_prompts"]["count"],
                           "tuning_seed_offset": cfg["seed_offset"], "lpips_backend": report.get("lpips_backend"),
                           **{f"space_{k}": str(v) for k, v in cfg["search_space"].items()}})
        now = int(time.time() * 1000)
        for s, res in report["schedulers"].items():
            d = res.get("chosen", {}).get("default")
            if d:
                mlflow.log_metrics({f"{s}/default_nfe_speedup": d["nfe_speedup"], f"{s}/default_lpips": d["lpips"]})
            if res.get("holdout", {}).get("target"):
                t = res["holdout"]["target"]
                mlflow.log_metrics({f"{s}/holdout_nfe_speedup": t["nfe_speedup"], f"{s}/holdout_lpips": t["lpips"]})
            for name, a in res.get("ablation", {}).items():
                if isinstance(a, dict) and "hypervolume" in a:
                    mlflow.log_metric(f"{s}/hypervolume_{name}", a["hypervolume"])
            seed0 = str(cfg.get("seed", 0))
            runs = [(search, seed0, r) for search, r in res.get("searches", {}).items()]
            runs += [(search, seed, r) for seed, rs in res.get("replicates", {}).items() for search, r in rs.items()]
            rep = res.get("ablation", {}).get("replicates")
            if rep:
                for name in ("optuna", "random"):
                    if name in rep:
                        mlflow.log_metric(f"{s}/hypervolume_{name}_mean", rep[name]["mean"])
            for search, seed, r in runs:
                for t in r["trials"]:
                    child = client.create_run(experiment.experiment_id,
                                              run_name=f"{s}/{search}/seed{seed}/{t['trial_id']}",
                                              tags={**tags, "mlflow.parentRunId": pid, "scheduler": s,
                                                    "search": search, "search_seed": seed,
                                                    "trial_id": t["trial_id"]})
                    metrics = {"nfe": t["nfe"], "lpips": t["lpips"], "quality": t["quality"],
                               "nfe_speedup": report["steps"] / t["nfe"], "seconds": t["seconds"],
                               **{k.replace("/", "_"): v for k, v in t.get("levels", {}).items()}}
                    client.log_batch(child.info.run_id,
                                     metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()
                                              if v is not None and math.isfinite(float(v))],
                                     params=[Param(k, str(v)) for k, v in t["config"].items()])
                    client.set_terminated(child.info.run_id)
        for path in (cfg["report_path"], cfg["plot_path"], cfg["policy_path"]):
            mlflow.log_artifact(path)
        mlflow.log_dict({s: {"pareto_front": res.get("pareto_front"), "chosen": res.get("chosen")}
                         for s, res in report["schedulers"].items()}, "pareto_front.json")
    return pid
