"""After the search: the default is confirmed on prompts of its own (``selection.confirm``) and
checked on bench_adaptive's held-out prompts against the hand-tuned row (``holdout``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from budgetdiff.io.fingerprint import content_sha256

from .checkpoints import Checkpoints
from .params import baseline_configs
from .search import beats, default_entry, margin, pareto_front, point_config
from .trials import holdout_task, tuning_prompts


def confirm_candidates(front: list[dict], baseline: dict, selection: dict) -> list[dict]:
    """The front points that beat ``baseline`` on both objectives (tuning prompts), best margin
    first, at most ``selection.confirm.candidates`` of them."""
    ratio = float(selection.get("loss_ratio", 1.0))
    k = int((selection.get("confirm") or {}).get("candidates", 3))
    dominating = [p for p in front if beats(p, baseline, ratio) and point_config(p) != baseline["config"]]
    return sorted(dominating, key=lambda p: -margin(p, baseline, ratio))[:k]


def confirm_choice(rows: dict, ratio: float = 1.0) -> tuple[str, str]:
    """Which row of a confirmation run ships: ``rows`` maps "baseline" and candidate names to
    {"nfe", "lpips"} measured on the confirmation prompts. Returns (name, why): the candidate that
    beats the baseline on both objectives by the largest margin there, else "baseline"."""
    base = rows["baseline"]
    ok = {n: r for n, r in rows.items() if n != "baseline" and beats(r, base, ratio)}
    if not ok:
        return "baseline", ("no candidate from the tuning front beat the baseline on the confirmation "
                            "prompts: the baseline ships")
    best = max(ok, key=lambda n: margin(ok[n], base, ratio))
    return best, "beat the baseline on the tuning and the confirmation prompts by the largest margin"


def checked_tasks(ck: Checkpoints, what: str, jobs: dict, task, ctx: dict, cpus: int, post=None) -> dict:
    """Run ``task(ctx, scheduler, configs)`` as a Ray task per scheduler in ``jobs``
    ({scheduler: configs}), concurrently, unless a checkpoint of the same ``what`` and configs
    exists; ``post`` shapes a fresh result before it is checkpointed. Returns {scheduler: result}."""
    import ray

    remote = ray.remote(num_cpus=cpus)(task)
    out, pending = {}, {}
    for s, (configs, key) in jobs.items():
        name = f"{what}_{s}_{content_sha256({'configs': configs, what: key}, 8)}"
        cached = ck.get(name)
        if cached is None:
            pending[s] = (name, remote.remote(ctx, s, configs))
        else:
            out[s] = cached
    for s, (name, obj) in pending.items():
        res = ray.get(obj)
        res = post(res) if post else res
        ck.put(name, res)
        out[s] = res
        print(f"[tune_skip] {s}: {what} done", file=sys.stderr, flush=True)
    return out


def baseline_trial(res: dict) -> dict | None:
    """The hand-tuned baseline as a trial-like dict (its warm-start trial when the search ran it)."""
    hand = res["baselines_tuning"].get("hand")
    if hand is None:
        return None
    for t in res["searches"]["optuna"]["trials"]:
        if point_config(t) == hand["config"]:
            return t
    return {"trial_id": "baseline-hand", "config": hand["config"], "nfe": hand["nfe"], "lpips": hand["lpips"],
            "quality": hand["quality"], "levels": hand.get("levels", {})}


def confirm(cfg: dict, ctx: dict, ck: Checkpoints, report: dict, chosen: dict) -> None:
    """Confirm each scheduler's default on prompts of their own (module docstring); updates
    ``chosen`` and the report in place. Checkpointed per scheduler and candidate set."""
    sel_cfg = cfg["selection"]
    conf = sel_cfg["confirm"]
    ratio = float(sel_cfg.get("loss_ratio", 1.0))
    prompts, seeds = tuning_prompts(conf["prompts_per_level"], int(conf["seed_offset"]))
    cctx = {**ctx, "prompts": prompts, "seeds": seeds, "batch_size": conf.get("batch_size")}
    jobs, plans = {}, {}
    for s, sel in chosen.items():
        res = report["schedulers"][s]
        base = baseline_trial(res)
        if base is None:
            continue
        hand = {**res["baselines_tuning"]["hand"], "config": point_config(base)}
        cands = confirm_candidates(pareto_front(res["searches"]["optuna"]["trials"]), hand, sel_cfg)
        plans[s] = (base, cands)
        if not cands:
            res["confirm"] = {"candidates": [], "chosen": sel["default"]["trial_id"],
                              "why": "no front point beat the baseline on the tuning prompts: nothing to confirm"}
            continue
        jobs[s] = ({"baseline": point_config(base), **{c["trial_id"]: point_config(c) for c in cands}}, conf)

    def shape(out: dict) -> dict:
        out["rows"] = {n: {k: v for k, v in r.items() if k != "levels"} for n, r in out["rows"].items()}
        out["candidates"] = list(out["rows"])[1:]
        return out

    done = checked_tasks(ck, "confirm", jobs, holdout_task, cctx, int(cfg.get("cpus_per_trial", 1)), post=shape)
    for s, out in done.items():
        report["schedulers"][s]["confirm"] = out
    for s, (base, cands) in plans.items():
        res = report["schedulers"][s]
        conf_res = res["confirm"]
        if not cands:
            continue
        pick, why = confirm_choice(conf_res["rows"], ratio)
        conf_res.update(chosen=pick, why=why,
                        prompts={"count": len(prompts), "seed_offset": int(conf["seed_offset"]),
                                 "per_level": conf["prompts_per_level"]})
        winner = base if pick == "baseline" else next(c for c in cands if c["trial_id"] == pick)
        chosen[s]["default"] = winner
        chosen[s]["why"] = why
        res["chosen"]["default"] = {
            **default_entry(winner, cfg["steps"], why),
            "confirmation": {k: conf_res["rows"][pick][k] for k in ("nfe", "lpips", "nfe_speedup", "quality")}}


def holdout(cfg: dict, ctx: dict, ck: Checkpoints, report: dict, chosen: dict) -> None:
    hold = cfg["holdout"]
    prompts, seeds = tuning_prompts(hold["prompts_per_level"], int(hold["seed_offset"]))
    hctx = {**ctx, "prompts": prompts, "seeds": seeds, "batch_size": hold.get("batch_size", 32)}
    jobs = {}
    for s, sel in chosen.items():
        configs = {"tuned": point_config(sel["default"])}
        if hold.get("remeasure_baseline"):
            configs["hand"] = baseline_configs(cfg, s).get("hand")
        jobs[s] = (configs, hold)
    for s, res in checked_tasks(ck, "holdout", jobs, holdout_task, hctx, int(cfg.get("cpus_per_trial", 1))).items():
        report["schedulers"][s]["holdout"] = res
    b = cfg.get("baseline") or {}
    targets = (hold.get("targets") or {}).get("nfe_speedup") or {}
    for s in chosen:
        h = report["schedulers"][s]["holdout"]
        tuned = h["rows"]["tuned"]
        hand = (h["rows"].get("hand") or
                hand_row_from_report(cfg.get("baseline_report"), s, float(b.get("threshold", 0.1))))
        h["prompts"] = {"count": len(prompts), "seed_offset": int(hold["seed_offset"]),
                        "per_level": hold["prompts_per_level"]}
        h["hand"] = hand
        # the target is the hand-tuned row itself; params' figures (the issue's 2.82x / 2.68x / 2.72x)
        # are those rows rounded, and are the target only when the row is not available
        target = hand["nfe_speedup"] if hand else targets.get(s)
        verdict = {"nfe_speedup": tuned["nfe_speedup"], "target_nfe_speedup": target,
                   "stated_target_nfe_speedup": targets.get(s),
                   "lpips": tuned["lpips"], "hand_lpips": hand["lpips"] if hand else None}
        verdict["nfe_met"] = None if target is None else bool(tuned["nfe_speedup"] >= target)
        verdict["lpips_met"] = None if not hand else bool(tuned["lpips"] <= hand["lpips"])
        verdict["met"] = bool(verdict["nfe_met"] and verdict["lpips_met"])
        h["target"] = verdict


def hand_row_from_report(path: str | None, scheduler: str, threshold: float) -> dict | None:
    """bench_adaptive's row of the hand-tuned δ for ``scheduler`` (reports/adaptive.json)."""
    if not path or not Path(path).is_file():
        return None
    report = json.loads(Path(path).read_text())
    res = (report.get("schedulers") or {}).get(scheduler)
    if not res:
        return None
    for row in res["rows"]:
        if row.get("kind") == "adaptive" and abs(float(row.get("params", {}).get("threshold", -1)) - threshold) < 1e-12:
            lp = next((k for k in row if k.startswith("mid/lpips")), None)
            return {"method": row["method"], "nfe": row["mean_nfe"], "nfe_speedup": row["nfe_speedup"],
                    "lpips": row.get(lp), "lpips_name": lp, "pixel/ssim": row.get("pixel/ssim"),
                    "high/iclip_domainclip": row.get("high/iclip_domainclip"), "pixel/psnr": row.get("pixel/psnr"),
                    "prompts": (report.get("prompts") or {}).get("count"), "guidance": report.get("guidance"),
                    "reuse": (report.get("reuse") or {}).get(scheduler)}
    return None
