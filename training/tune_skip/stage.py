"""The stage ``tune_skip`` from start to end (the package docstring describes it): references,
search, selection, confirmation, held-out check, ablation; ``python -m training.tune_skip``."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from mlops.cli import ArgumentParser, command

from .checkpoints import REFERENCE_KEYS, Checkpoints, run_key
from .confirm import confirm, holdout
from .params import TuneSkipConfig, absolute_path, baseline_configs, check_config, default_guidance
from .report import ablation, log_mlflow, write_outputs
from .search import run_search, select_all, start_ray
from .trials import reference_task, tuning_prompts

DESCRIPTION = ("Ray Tune searches AdaptiveDiffusion's skip settings per scheduler and writes the skip "
               "policy that the engine ships.")


def tune(cfg: dict) -> dict:
    """Run the whole stage (module docstring) on validated params; returns the report dict.
    Writes the policy file, report and plot as soon as the Optuna phase is done, and again after
    each later phase."""
    cfg = check_config(cfg)
    cfg.setdefault("work_dir", absolute_path(".cache/tune_skip"))
    import ray

    started = start_ray(cfg)
    try:
        return _tune(cfg)
    finally:
        if started:
            ray.shutdown()


def _tune(cfg: dict) -> dict:
    import ray

    t0 = time.time()
    key = run_key(cfg)
    ck = Checkpoints(cfg["work_dir"], key)
    ref_ck = Checkpoints(cfg["work_dir"], "references-" + run_key(cfg, REFERENCE_KEYS))
    prompts, seeds = tuning_prompts(cfg["prompts_per_level"], int(cfg["seed_offset"]))
    steps, cpus = int(cfg["steps"]), int(cfg.get("cpus_per_trial", 1))
    guidance = cfg.get("guidance")
    if guidance is None:
        guidance = default_guidance(cfg)
    ctx = {"model": cfg["model"], "prompts": prompts, "seeds": seeds, "steps": steps, "guidance": float(guidance),
           "threads": cpus, "clip_dir": cfg.get("clip_dir"), "batch_size": cfg.get("batch_size"), "key": key}
    report: dict = {"model": cfg["model"], "model_class": cfg["model_class"], "steps": steps,
                    "guidance": float(guidance), "run_key": key,
                    "tuning_prompts": {"count": len(prompts), "seed_offset": int(cfg["seed_offset"]),
                                       "per_level": cfg["prompts_per_level"]},
                    "search_space": cfg["search_space"], "num_samples": int(cfg["num_samples"]),
                    "seed": int(cfg.get("seed", 0)), "cpus_per_trial": cpus,
                    "max_concurrent": cfg.get("max_concurrent"),
                    "ray": {"address": os.environ.get("RAY_ADDRESS") or "local (private)",
                            "cluster_cpus": ray.cluster_resources().get("CPU")},
                    "objectives": {"nfe": "mean network evaluations per image (min)",
                                   "lpips": "mean LPIPS against the full-step image (min)"},
                    "selection_rule": cfg.get("selection"), "baseline": cfg.get("baseline"),
                    "schedulers": {}}

    # 1. Full-step references and baselines, one Ray task per scheduler.
    remote_ref = ray.remote(num_cpus=cpus)(reference_task)
    pending = {}
    refs: dict[str, Any] = {}
    for s in cfg["schedulers"]:
        cached = ref_ck.get(f"reference_{s}")
        path = ref_ck.dir / f"refs_{s}.pt"
        if cached and path.is_file():
            import torch

            refs[s] = ray.put(torch.load(path, weights_only=True))
            report["schedulers"][s] = {"reference_seconds": cached["reference_seconds"],
                                       "baselines_tuning": cached["baselines"]}
        else:
            pending[s] = remote_ref.remote(ctx, s, baseline_configs(cfg, s))
    for s, obj in pending.items():
        import torch

        res = ray.get(obj)
        torch.save(res["refs"], ref_ck.dir / f"refs_{s}.pt")
        refs[s] = ray.put(res["refs"])
        ref_ck.put(f"reference_{s}", {"reference_seconds": res["reference_seconds"], "baselines": res["baselines"]})
        report["schedulers"][s] = {"reference_seconds": res["reference_seconds"], "baselines_tuning": res["baselines"]}
        print(f"[tune_skip] {s}: references ready ({res['reference_seconds']:.0f} s)", file=sys.stderr, flush=True)

    # 2. The Optuna search per scheduler, then the selection and the policy file.
    searches = cfg.get("searches", ["optuna", "random"])
    lpips_name = None
    for s in cfg["schedulers"]:
        res = ck.get(f"search_{s}_optuna")
        if res is None:
            res = run_search(cfg, ctx, refs[s], s, "optuna")
            ck.put(f"search_{s}_optuna", res)
        report["schedulers"][s]["searches"] = {"optuna": res}
        lpips_name = next(iter(v["lpips_name"] for v in report["schedulers"][s]["baselines_tuning"].values()))
    report["lpips_backend"] = lpips_name
    chosen = select_all(cfg, report, lpips_name)
    if (cfg.get("selection") or {}).get("confirm"):
        confirm(cfg, ctx, ck, report, chosen)
    write_outputs(cfg, report, chosen, t0)

    # 3. Held-out check of the default points on bench_adaptive's prompts.
    if cfg.get("holdout"):
        holdout(cfg, ctx, ref_ck, report, chosen)
        write_outputs(cfg, report, chosen, t0)

    # 4. The ablation: the same budget with random search; hypervolumes.
    if "random" in searches:
        for s in cfg["schedulers"]:
            res = ck.get(f"search_{s}_random")
            if res is None:
                res = run_search(cfg, ctx, refs[s], s, "random")
                ck.put(f"search_{s}_random", res)
            report["schedulers"][s]["searches"]["random"] = res
        # replicates of both searches at further seeds (ablation only: the policy comes from the
        # first seed's Optuna search), so the comparison is not one draw per scheduler
        for seed in cfg.get("ablation_seeds") or []:
            rcfg = {**cfg, "seed": int(seed), "_replicate": True}
            for s in cfg["schedulers"]:
                runs = report["schedulers"][s].setdefault("replicates", {}).setdefault(str(seed), {})
                for search in searches:
                    res = ck.get(f"search_{s}_{search}_seed{seed}")
                    if res is None:
                        res = run_search(rcfg, ctx, refs[s], s, search)
                        ck.put(f"search_{s}_{search}_seed{seed}", res)
                    runs[search] = res
            write_outputs(cfg, report, chosen, t0)
        ablation(report)
    report["seconds_total"] = round(time.time() - t0, 1)
    write_outputs(cfg, report, chosen, t0, final=True)
    log_mlflow(cfg, report)
    return report


@command
def main(argv: list[str] | None = None) -> None:
    """The command line: bad params (or a bad params file) are one ``error:`` line, exit status 2,
    before Ray starts."""
    from mlops.params import config_dict, load_config

    parser = ArgumentParser(prog="python -m training.tune_skip", description=DESCRIPTION)
    parser.add_argument("--model", help="a local model directory (embedded model, SD 1.5 or SDXL) to tune instead")
    parser.add_argument("--params", help="params file (default params.yaml)")
    args = parser.parse_args(argv)
    # The section is read once and type-checked here (unknown, missing, mistyped keys named); the
    # search machinery below reads it as plain data (check_config adds absolute paths, model_class).
    cfg = config_dict(load_config("tune_skip", TuneSkipConfig, args.params))
    if args.model:
        cfg = {**cfg, "model": args.model, "baseline_report": None}
    report = tune(check_config(cfg))
    summary = {s: {"default": res.get("chosen", {}).get("default"),
                   "holdout": (res.get("holdout") or {}).get("target"),
                   "hypervolume": {k: v.get("hypervolume") for k, v in (res.get("ablation") or {}).items()
                                   if isinstance(v, dict) and "hypervolume" in v}}
               for s, res in report["schedulers"].items()}
    print(json.dumps({"policy": report["policy"], "schedulers": summary, "seconds_total": report["seconds_total"]},
                     default=float))
