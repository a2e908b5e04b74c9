"""The search: one Ray Tune run (Optuna's multi-objective TPE, or its random sampler) per
scheduler, the Pareto front of its trials and the selection rule that picks the default and the
per-quality-level points."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .params import baseline_configs
from .trials import skip_trial


def pareto_front(points: list[dict], x: str = "nfe", y: str = "lpips") -> list[dict]:
    """The non-dominated points (both objectives minimised), sorted by ``x``."""
    front = []
    for p in sorted(points, key=lambda p: (p[x], p[y])):
        if not front or p[y] < front[-1][y]:
            front.append(p)
    return front


def hypervolume(points: list[dict], ref: tuple[float, float], x: str = "nfe", y: str = "lpips") -> float:
    """2-D hypervolume dominated by ``points`` up to the reference point ``ref`` (minimisation)."""
    hv, prev_y = 0.0, ref[1]
    for p in pareto_front([p for p in points if p[x] < ref[0] and p[y] < ref[1]], x, y):
        hv += (ref[0] - p[x]) * (prev_y - p[y])
        prev_y = p[y]
    return hv


def point_config(trial: dict) -> dict:
    return {k: trial["config"][k] for k in ("threshold", "max_skip", "warmup", "reuse")}


def select_points(front: list[dict], baseline: dict | None, selection: dict) -> dict:
    """The selection rule (module docstring): {"default": trial, "levels": {q: trial}, "why": str}."""
    if not front:
        raise ValueError("selection: the Pareto front is empty")
    ratio = float(selection.get("loss_ratio", 1.0))
    why = ""
    default = None
    if baseline is not None:
        dominating = [p for p in front if beats(p, baseline, ratio)]
        if dominating:
            default = max(dominating, key=lambda p: margin(p, baseline, ratio))
            why = "dominates the baseline by the largest margin (min of the relative NFE and loss gains)"
        else:
            ok = [p for p in front if p["lpips"] <= ratio * baseline["lpips"]]
            if ok:
                default = min(ok, key=lambda p: p["nfe"])
                why = "no front point dominates the baseline: the fewest NFE at no more loss"
    if default is None:
        default = min(front, key=lambda p: p["lpips"])
        why = why or "no baseline: the lowest-loss front point"
    levels = {}
    for q in sorted(float(v) for v in selection.get("quality_levels", [])):
        ok = [p for p in front if p["quality"] >= q]
        if ok:
            levels[q] = min(ok, key=lambda p: (p["nfe"], -p["quality"]))
    return {"default": default, "levels": levels, "why": why}


def beats(p: dict, baseline: dict, ratio: float) -> bool:
    """``p`` is at least as good as ``baseline`` on both objectives (loss scaled by ``ratio``)."""
    return p["nfe"] <= baseline["nfe"] and p["lpips"] <= ratio * baseline["lpips"]


def margin(p: dict, baseline: dict, ratio: float) -> float:
    """By how much ``p`` beats ``baseline``: the smaller of the relative NFE and loss gains."""
    return min(baseline["nfe"] / p["nfe"] - 1.0, ratio * baseline["lpips"] / max(p["lpips"], 1e-12) - 1.0)


def default_entry(trial: dict, steps: int, why: str) -> dict:
    """The report's ``chosen.default``: the trial's config and objectives, and why it was chosen."""
    return {"trial_id": trial["trial_id"], **point_config(trial), "nfe": trial["nfe"],
            "nfe_speedup": steps / trial["nfe"], "lpips": trial["lpips"], "quality": trial["quality"], "why": why}


def select_all(cfg: dict, report: dict, lpips_name: str) -> dict:
    chosen = {}
    for s, res in report["schedulers"].items():
        trials = res["searches"]["optuna"]["trials"]
        front = pareto_front(trials)
        base = res["baselines_tuning"].get("hand")
        sel = select_points(front, base, cfg.get("selection") or {})
        sel["lpips_name"] = lpips_name
        chosen[s] = sel
        res["pareto_front"] = [{"trial_id": t["trial_id"], **point_config(t), "nfe": t["nfe"], "lpips": t["lpips"],
                                "quality": t["quality"]} for t in front]
        res["chosen"] = {"default": default_entry(sel["default"], cfg["steps"], sel["why"]),
                         "quality_levels": {f"{q:g}": {"trial_id": t["trial_id"], **point_config(t), "nfe": t["nfe"],
                                                        "quality": t["quality"], "lpips": t["lpips"]}
                                            for q, t in sel["levels"].items()}}
    return chosen


def start_ray(cfg: dict) -> bool:
    """Join ``RAY_ADDRESS`` when it is set; otherwise start a private local Ray (never attach to
    another cluster running on this machine). Returns True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    runtime_env = cfg.get("runtime_env") or None
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        # Ray starts its workers at niceness 15; on a shared machine that starves the trials.
        os.environ.setdefault("RAY_worker_niceness", str(int(cfg.get("worker_niceness", 0))))
        ray.init(address="local", num_cpus=int(cfg.get("ray_num_cpus") or os.cpu_count() or 2),
                 include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    return True


def progress_callback(total: int, desc: str):
    """A tqdm bar over a tuner's trials (Tune's own status tables are too chatty for a log).
    Tune pickles its callbacks with the experiment state: the bar is made lazily, not pickled."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        def __init__(self):
            self.total, self.desc, self.bar = total, desc, None

        def __getstate__(self):
            return {"total": self.total, "desc": self.desc, "bar": None}

        def on_trial_complete(self, iteration, trials, trial, **info):
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=self.total, desc=self.desc, unit="trial", mininterval=5)
            r = trial.last_result or {}
            if "nfe" in r:
                self.bar.set_postfix(nfe=f"{r['nfe']:.1f}", lpips=f"{r['lpips']:.2e}")
            self.bar.update(1)

        def on_experiment_end(self, trials, **info):
            if self.bar is not None:
                self.bar.close()

    return TrialProgress()


def _in_space(c: dict, space: dict) -> bool:
    return (float(space["threshold_min"]) <= c["threshold"] <= float(space["threshold_max"])
            and int(space["max_skip_min"]) <= c["max_skip"] <= int(space["max_skip_max"])
            and int(space["warmup_min"]) <= c["warmup"] <= int(space["warmup_max"]) and c["reuse"] in space["reuse"])


def run_search(cfg: dict, ctx: dict, refs_ref, scheduler: str, search: str) -> dict:
    """One Tuner run: ``num_samples`` trials of ``search`` ("optuna": TPE; "random": Optuna's
    RandomSampler, same seed) for one scheduler. Returns its trials and wall-clock."""
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    space = cfg["search_space"]
    param_space = {
        "threshold": tune.loguniform(float(space["threshold_min"]), float(space["threshold_max"])),
        "max_skip": tune.randint(int(space["max_skip_min"]), int(space["max_skip_max"]) + 1),  # hi excluded
        "reuse": tune.choice(list(space["reuse"])),
        "warmup": tune.randint(int(space["warmup_min"]), int(space["warmup_max"]) + 1),
    }
    seed = int(cfg.get("seed", 0))
    if search == "optuna":
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                             n_startup_trials=int(cfg.get("optuna_startup_trials", 8)))
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    # Warm start (both searches alike): the baseline configs are evaluated first, as a Tune user
    # seeds a search with known-good points; the rest of the budget is the sampler's.
    warm = [baseline_configs(cfg, scheduler)[k] for k in ("hand", "paper")
            if cfg.get("warm_start", True) and k in baseline_configs(cfg, scheduler)]
    warm = [w for w in warm if _in_space(w, space)]
    searcher = OptunaSearch(metric=["nfe", "lpips"], mode=["min", "min"], sampler=sampler,
                            points_to_evaluate=warm or None)
    if cfg.get("max_concurrent"):
        searcher = ConcurrencyLimiter(searcher, max_concurrent=int(cfg["max_concurrent"]))
    trial_ctx = {**ctx, "scheduler": scheduler}
    trainable = tune.with_resources(tune.with_parameters(skip_trial, ctx=trial_ctx, refs=refs_ref),
                                    {"cpu": int(cfg.get("cpus_per_trial", 1))})
    name = f"{scheduler}_{search}_{ctx['key']}" + (f"_seed{seed}" if cfg.get("_replicate") else "")
    tuner = tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=int(cfg["num_samples"]), reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(Path(cfg["work_dir"]) / "ray_results"), verbose=0,
                                  callbacks=[progress_callback(int(cfg["num_samples"]), f"{scheduler} {search}")]),
    )
    start = time.time()
    grid = tuner.fit()
    wall = time.time() - start
    trials = []
    for i, r in enumerate(grid):
        if r.error is not None or not r.metrics or "nfe" not in r.metrics:
            trials.append({"trial_id": f"{search}-{i}", "error": str(r.error)[:300]})
            continue
        m = r.metrics
        levels = {k: m[k.replace("/", "_")] for k in ("pixel/psnr", "pixel/ssim", "high/iclip_domainclip",
                                                      "mid/lpips_alex", "mid/lpips_alex_randinit")
                  if k.replace("/", "_") in m}
        trials.append({"trial_id": f"{search}-{m.get('trial_id', i)}", "order": i, "config": dict(r.config),
                       "nfe": float(m["nfe"]), "lpips": float(m["lpips"]), "quality": float(m["quality"]),
                       "levels": levels, "seconds": float(m.get("seconds", 0.0)),
                       "time_total_s": float(m.get("time_total_s", 0.0)), "timestamp": m.get("timestamp")})
    # Tune's ResultGrid is not in launch order: order by the time each trial reported.
    ok = sorted([t for t in trials if "error" not in t], key=lambda t: (t["timestamp"] or 0, t["order"]))
    for k, t in enumerate(ok):
        t["order"] = k
    return {"search": search, "sampler": type(sampler).__name__, "seed": seed, "warm_start": warm, "trials": ok,
            "errors": [t for t in trials if "error" in t], "wall_seconds": round(wall, 1),
            "trial_cpu_seconds": round(sum(t["seconds"] for t in ok), 1)}
