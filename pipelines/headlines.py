"""DVC headlines: a few numbers per stage, derived from the committed full reports (issue 22, point 3).

Every stage writes a full report (``reports/<name>.json``): hundreds or thousands of keys, all
of them kept as outputs. As DVC metrics they made ``dvc metrics show`` thousands of columns wide.
This module reads those reports and writes one small flat JSON per stage,
``reports/headlines/<stage>.json``: the numbers a reader compares between commits, namely whether
the stage's targets are met, its key ratios (speed-ups, NFE and GFLOP reductions) and quality at
its operating point. From those it writes each stage's scorecard, ``reports/scorecard/<stage>.json``:
the same few words for every stage (``WORDS``: targets met, speed-up, quality, ...), which are the
DVC metrics, so that ``dvc metrics show`` is one row per stage and one column per word and
``dvc metrics diff`` reads like a changelog; ``reports/scorecard.md`` says which headline each word
is. It reruns no training or benchmark: it only reads JSON, so it is cheap and deterministic.

``HEADLINES`` is the whole definition: ``{stage: (report_path, {headline_key: source})}``, where
``source`` is a JSON path (a tuple of dict keys and list indices into the report) or, for the few
values that must be computed (a ratio, a conjunction of ``met`` flags, the row of a list that
matches a condition), a small function of the report built from the helpers below. Stage names
are dvc.yaml's; a ``foreach`` stage has one entry per key (``distill_8@cfg``, ...). Headline keys
keep the reports' metric names: ``lpips_alex_randinit`` is LPIPS on a *randomly initialised*
AlexNet, ``clipt_domainclip`` CLIP-T in the project's own small domain CLIP, and so on.

Output: floats rounded to 4 significant digits (so cosmetic noise does not show in
``dvc metrics diff``), ints and bools as they are, sorted keys, no timestamps and no host facts;
each file written atomically. A missing report, a missing key, or a value that is not a finite
number or a bool (``null``, ``NaN``, a string) is an error (``HeadlineError``): the headline
would otherwise silently disappear from ``dvc metrics diff``.

    python -m pipelines.headlines [--reports-dir reports] [--out-dir reports/headlines]
                                  [--scorecard-dir reports/scorecard] [--stage NAME ...]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from budgetdiff.io import atomic_write_bytes, atomic_write_json
from mlops.cli import ArgumentParser, print_error

Path_ = tuple  # a JSON path: dict keys (str) and list indices (int)
Source = Union[Path_, Callable[[dict], Any]]

SIGNIFICANT_DIGITS = 4
MIN_KEYS, MAX_KEYS = 2, 10


class HeadlineError(ValueError):
    """A report is missing, lacks a headline's path, or holds a value that is not a number or bool."""


class MissingPath(LookupError):
    """Raised by ``dig`` (and the helpers) with the path that is not in the report."""

    def __init__(self, path: Sequence):
        super().__init__(format_path(path))
        self.path = tuple(path)


def format_path(path: Sequence) -> str:
    """``["targets"]["ddim"]["met"]``: unambiguous, since report keys themselves contain '/', '.', ' '."""
    return "".join(f"[{p}]" if isinstance(p, int) else f"[{json.dumps(p, ensure_ascii=False)}]" for p in path)


def dig(report: Any, path: Sequence) -> Any:
    """The value at ``path`` in ``report``; ``MissingPath`` naming the whole path when absent."""
    node = report
    for i, part in enumerate(path):
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and not isinstance(part, bool) \
                and -len(node) <= part < len(node):
            node = node[part]
        else:
            raise MissingPath(path[: i + 1])
    return node


# ----------------------------------------------------------------------------------------------
# The few computed headlines
# ----------------------------------------------------------------------------------------------
def all_of(*paths: Path_) -> Callable[[dict], bool]:
    """True when every path holds true (targets met on every scheduler / attribute)."""
    def f(report: dict) -> bool:
        values = [dig(report, p) for p in paths]
        for p, v in zip(paths, values):
            if not isinstance(v, bool):
                raise HeadlineError(f"{format_path(p)} is {v!r}, not a bool")
        return all(values)
    return f


def ratio(numerator: Path_, denominator: Path_) -> Callable[[dict], float]:
    def f(report: dict) -> float:
        num, den = dig(report, numerator), dig(report, denominator)
        if not _is_number(num) or not _is_number(den) or den == 0:
            raise HeadlineError(f"ratio {format_path(numerator)} / {format_path(denominator)}: {num!r} / {den!r}")
        return num / den
    return f


def _rows(report: dict, list_path: Path_) -> list:
    rows = dig(report, list_path)
    if not isinstance(rows, list) or not rows:
        raise HeadlineError(f"{format_path(list_path)} is not a non-empty list")
    return rows


def every(list_path: Path_, field: str) -> Callable[[dict], bool]:
    """True when ``field`` is true in every row of the list at ``list_path`` (and there is a row)."""
    def f(report: dict) -> bool:
        values = [dig(report, (*list_path, i, field)) for i in range(len(_rows(report, list_path)))]
        if not all(isinstance(v, bool) for v in values):
            raise HeadlineError(f"{format_path((*list_path, '*', field))} holds a value that is not a bool")
        return all(values)
    return f


def lowest(list_path: Path_, field: str) -> Callable[[dict], float]:
    """The smallest ``field`` over the rows of the list at ``list_path``."""
    def f(report: dict) -> float:
        return min(_number(dig(report, (*list_path, i, field)), (*list_path, i, field))
                   for i in range(len(_rows(report, list_path))))
    return f


def at_guidance(guidance: str, field: str) -> Callable[[dict], Any]:
    """``field`` of the guidance sweep's row at the guidance the report names under ``guidance``."""
    def f(report: dict) -> Any:
        key = _key_equal_to(report, ("guidance_sweep",), dig(report, (guidance,)), guidance)
        return dig(report, ("guidance_sweep", key, field))
    return f


def at_default_guidance(field: str) -> Callable[[dict], Any]:
    """``field`` of the guidance sweep's row at the report's ``default_guidance`` (the operating point)."""
    return at_guidance("default_guidance", field)


def distill_gflops_reduction(report: dict) -> float:
    """teacher@50's UNet GFLOPs per image over the CFG-aware 8-step student's, at the target guidance."""
    teacher, student = ("results", "teacher_50"), ("results", "student_8_cfg")
    key = _key_equal_to(report, teacher, dig(report, ("target_guidance",)), "target_guidance")
    return ratio((*teacher, key, "gflops_per_image"), (*student, key, "gflops_per_image"))(report)


def _key_equal_to(report: dict, mapping_path: Path_, number: Any, what: str) -> str:
    """The key of the dict at ``mapping_path`` that spells ``number`` ("1.25" for 1.25)."""
    mapping = dig(report, mapping_path)
    if isinstance(mapping, dict) and _is_number(number):
        for key in mapping:
            if _float_or_none(key) == float(number):
                return key
    raise MissingPath((*mapping_path, f"{number} ({what})"))


def calibrate_default(field_path: Path_) -> Callable[[dict], Any]:
    """``field_path`` of the calibrated policy's default plan: the candidate named ``policy.default``."""
    def f(report: dict) -> Any:
        return dig(report, (*_default_candidate_path(report), *field_path))
    return f


def calibrate_default_gflops_reduction(report: dict) -> float:
    """The reference plan's (full steps) UNet GFLOPs per image over the default plan's."""
    return ratio(("policy", "reference", "gflops_per_image"),
                 (*_default_candidate_path(report), "measured", "gflops_per_image"))(report)


def _default_candidate_path(report: dict) -> Path_:
    name = dig(report, ("policy", "default"))
    candidates = dig(report, ("policy", "candidates"))
    for i, c in enumerate(candidates if isinstance(candidates, list) else []):
        if isinstance(c, dict) and c.get("name") == name:
            return ("policy", "candidates", i)
    raise MissingPath(("policy", "candidates", f"name == {name!r} (policy.default)"))


GATE_VERDICTS = ("promoted", "refused", "unchanged")  # registry/promote.py


def _verdict(report: dict) -> str:
    verdict = dig(report, ("gate", "verdict"))
    if verdict not in GATE_VERDICTS:
        raise HeadlineError(f'["gate"]["verdict"] is {verdict!r}, not one of {", ".join(GATE_VERDICTS)}')
    return verdict


def gate_verdict_is(verdict: str) -> Callable[[dict], bool]:
    def f(report: dict) -> bool:
        return _verdict(report) == verdict
    return f


def gate_checks_failed(report: dict) -> int:
    """How many gate thresholds the challenger missed (0 when nothing was judged: ``unchanged``)."""
    if _verdict(report) == "unchanged":
        return 0
    failed = dig(report, ("gate", "failed"))
    if not isinstance(failed, list):
        raise HeadlineError(f"{format_path(('gate', 'failed'))} is {failed!r}, not a list")
    return len(failed)


def gate_metric(name: str) -> Callable[[dict], Any]:
    """The judged version's metric ``name``: the challenger's, or with verdict ``unchanged`` (the
    challenger is the champion already; registry/stage.py then reports the numbers the champion
    was judged with) the champion's."""
    def f(report: dict) -> Any:
        side = "champion_metrics" if _verdict(report) == "unchanged" else "challenger_metrics"
        return dig(report, ("gate", side, name))
    return f


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
SCHEDULERS = ("ddim", "dpmpp", "euler")


def _distill_training(report: str) -> tuple[str, dict[str, Source]]:
    """distill_16 and every distill_8 variant: the same training report. The student's default
    guidance is its teacher's (where bench_distill judges it); the training sweep's rows are at
    other candidates, so its accuracy headline is at the sweep's best."""
    return (report, {
        "final_train_loss": ("final_train_loss",),
        "heldout_loss_dstl_cfg": ("heldout_loss_dstl", "student_ema", "cfg"),
        "heldout_loss_dstl_vanilla": ("heldout_loss_dstl", "student_ema", "vanilla"),
        "default_guidance": ("default_guidance",),
        "sweep_best_guidance": ("sweep_best_guidance",),
        "all_attributes_at_sweep_best": at_guidance("sweep_best_guidance", "all_attributes"),
    })


_DISTILL_TARGETS = {
    "fd": ("targets", "fd_student_8_cfg_le_1.1x_teacher_50"),
    "attr_acc": ("targets", "attr_acc_student_8_cfg_ge_teacher_8"),
    "clipt": ("targets", "clipt_student_8_cfg_ge_student_8_vanilla"),
}

HEADLINES: dict[str, tuple[str, dict[str, Source]]] = {
    "train_base": ("reports/train_base.json", {
        "final_train_loss": ("final_train_loss",),
        "default_guidance": ("default_guidance",),
        "all_attributes_at_default_guidance": at_default_guidance("all_attributes"),
        "position_at_default_guidance": at_default_guidance("position"),
    }),
    # final_train_loss is left out: a resumed run with no step to take reports NaN.
    "finetune_base": ("reports/finetune_base.json", {
        "default_guidance": ("default_guidance",),
        "attr_acc_at_default_guidance": at_default_guidance("attr_acc"),
        "all_attributes_at_default_guidance": at_default_guidance("all_attributes"),
        "position_at_default_guidance": at_default_guidance("position"),
    }),
    "train_clip": ("reports/train_clip.json", {
        "held_out_image_to_text_top1": ("held_out/image_to_text_top1",),
        "held_out_image_to_text_top1_1obj": ("held_out/image_to_text_top1_1obj",),
        "final_train_loss": ("final_train_loss",),
    }),
    "train_attributes": ("reports/train_attributes.json", {
        "held_out_1obj_all_attributes": ("held_out", "1obj", "all_attributes"),
        "held_out_4obj_all_attributes": ("held_out", "4obj", "all_attributes"),
        "final_train_loss": ("final_train_loss",),
    }),
    "bench_metrics": ("reports/metrics.json", {
        "attr_checker_target_1obj_met": ("attribute_checker", "target_1obj_met"),
        "attr_checker_1obj_all_attributes": ("attribute_checker", "1obj", "all_attributes"),
        "attr_checker_4obj_all_attributes": ("attribute_checker", "4obj", "all_attributes"),
        "domainclip_image_to_text_top1": ("domain_clip_retrieval", "image_to_text_top1"),
        "fd_domainclip_rendered_vs_rendered": ("fd_sanity", "rendered_vs_rendered"),
        "fd_domainclip_rendered_vs_noisy_sigma_0_2": ("fd_sanity", "rendered_vs_noisy_sigma0.2"),
        "fd_domainclip_rendered_vs_uniform_noise": ("fd_sanity", "rendered_vs_uniform_noise"),
        "all_metrics_images_per_s": ("throughput", "all_metrics_images_per_s"),
    }),
    "bench_base": ("reports/base.json", {
        "targets_1_object_met": all_of(*(("targets_1_object", a, "met") for a in ("color", "shape", "position"))),
        "1obj_color": ("targets_1_object", "color", "measured"),
        "1obj_shape": ("targets_1_object", "shape", "measured"),
        "1obj_position": ("targets_1_object", "position", "measured"),
        **{f"attr_acc_{n}obj": ("levels", str(n), "model", "checker", "attr_acc") for n in (1, 2, 3, 4)},
    }),
    "distill_16": _distill_training("reports/distill_16.json"),
    # distill_8 is a foreach over params.yaml's distill_8_variants (metrics_path of each).
    "distill_8@cfg": _distill_training("reports/distill_8.json"),
    "distill_8@vanilla": _distill_training("reports/distill_8_vanilla.json"),
    "distill_8@cfgonly": _distill_training("reports/distill_8_cfgonly.json"),
    "distill_8@cfg_seed1": _distill_training("reports/distill_8_seed1.json"),
    "distill_8@vanilla_seed1": _distill_training("reports/distill_8_vanilla_seed1.json"),
    "distill_8@cfg_seed2": _distill_training("reports/distill_8_seed2.json"),
    "distill_8@vanilla_seed2": _distill_training("reports/distill_8_vanilla_seed2.json"),
    # The targets at the target guidance; CLIP-T is the mean over the training seeds (see the report).
    "bench_distill": ("reports/distill.json", {
        "fd_target_met": (*_DISTILL_TARGETS["fd"], "met"),
        "attr_acc_target_met": (*_DISTILL_TARGETS["attr_acc"], "met"),
        "clipt_target_met": (*_DISTILL_TARGETS["clipt"], "met"),
        "student_8_cfg_fd": (*_DISTILL_TARGETS["fd"], "measured"),
        "fd_limit_1_1x_teacher_50": (*_DISTILL_TARGETS["fd"], "limit"),
        "student_8_cfg_attr_acc": (*_DISTILL_TARGETS["attr_acc"], "measured"),
        "teacher_8_attr_acc": (*_DISTILL_TARGETS["attr_acc"], "limit"),
        "student_8_cfg_clipt_seed_mean": (*_DISTILL_TARGETS["clipt"], "measured"),
        "student_8_vanilla_clipt_seed_mean": (*_DISTILL_TARGETS["clipt"], "limit"),
        "gflops_reduction_vs_teacher_50": distill_gflops_reduction,
    }),
    "render": ("reports/render.json", {
        "images": ("images",),
        "shards": ("shards",),
    }),
    "pilot_detail": ("reports/pilot_detail.json", {
        "largest_detail_variance_kept_at_8": ("decision", "largest_variance_kept_at_8_on_detailed"),
        "faintly_grainy_variance_kept_at_8": ("classes", "faintly grainy", "variance_kept", "8"),
        "heavily_mottled_variance_kept_at_8": ("classes", "heavily mottled", "variance_kept", "8"),
    }),
    "ablate_composition": ("reports/ablate_composition.json", {
        "objects_all_right_at_1_25": ("by_guidance", "1.25", "per_object", "all_right"),
        "objects_with_other_colour_at_1_25": ("by_guidance", "1.25", "per_object", "color_from_other"),
        "objects_in_cell_at_1_25": ("by_guidance", "1.25", "per_object", "in_cell"),
    }),
    "bench_render": ("reports/bench_render.json", {
        "network_evaluations_per_s_1_worker": ("network_evaluations_per_s", "1"),
        "network_evaluations_per_s_2_workers": ("network_evaluations_per_s", "2"),
        "speedup_2_vs_1_workers": ratio(("network_evaluations_per_s", "2"), ("network_evaluations_per_s", "1")),
    }),
    "dataset": ("reports/dataset.json", {
        "rows": ("rows",),
        "prompts": ("prompts",),
        "knee_median_steps": ("knee", "median"),
        "knee_iqr_steps": ("knee", "iqr"),
        "knee_not_reached_fraction": ("knee", "not_reached_fraction"),
        "seed_agreement_ssim_mean": ("seed_agreement", "pixel/ssim", "mean"),
        "seed_agreement_lpips_alex_randinit_mean": ("seed_agreement", "mid/lpips_alex_randinit", "mean"),
        "seed_agreement_iclip_domainclip_mean": ("seed_agreement", "high/iclip_domainclip", "mean"),
    }),
    # At each scheduler's tuned δ: NFE speed-up and PSNR against the full 50 steps; the targets
    # (>= 2x at >= 25 dB; LPIPS better than DeepCache, PAB, uniform at equal FLOPs; estimator
    # overhead) on all three schedulers.
    "bench_adaptive": ("reports/adaptive.json", {
        **{f"{s}_nfe_speedup": ("targets", s, "nfe_speedup_at_psnr", "nfe_speedup") for s in SCHEDULERS},
        **{f"{s}_psnr": ("targets", s, "nfe_speedup_at_psnr", "psnr") for s in SCHEDULERS},
        "nfe_speedup_target_met": all_of(*(("targets", s, "nfe_speedup_at_psnr", "met") for s in SCHEDULERS)),
        "lpips_alex_randinit_vs_peers_target_met": all_of(*(("targets", s, "lpips_met") for s in SCHEDULERS)),
        "estimator_overhead_target_met": all_of(*(("targets", s, "estimator_overhead_pct", "met")
                                                  for s in SCHEDULERS)),
    }),
    "train_budget": ("reports/train_budget.json", {
        "bilstm_best_val_loss": ("bilstm", "best_val_loss"),
        "mlp_best_val_loss": ("mlp", "best_val_loss"),
        "bilstm_plateau_epsilon": ("bilstm", "plateau_epsilon"),
        "bilstm_val_mae_ssim": ("bilstm", "val_mae", "pixel/ssim", "mean"),
        "mean_curve_val_mae_ssim": ("bilstm", "val_mae_mean_curve_baseline", "pixel/ssim", "mean"),
        "bilstm_val_mae_lpips_alex_randinit": ("bilstm", "val_mae", "mid/lpips_alex_randinit", "mean"),
        "bilstm_val_mae_iclip_domainclip": ("bilstm", "val_mae", "high/iclip_domainclip", "mean"),
    }),
    # The cross-validated allocation (all prompts, repeated k-fold): what the README reports.
    "bench_budget": ("reports/budget.json", {
        "cv_steps_saved_pct": ("cross_validation", "targets", "steps_saved_at_quality", "steps_saved_pct"),
        "cv_beats_uniform_met": ("cross_validation", "targets", "beats_uniform", "met"),
        "cv_steps_saved_at_quality_met": ("cross_validation", "targets", "steps_saved_at_quality", "met"),
        **{f"cv_margin_vs_uniform_{lv}": ("cross_validation", "targets", "beats_uniform", "margin", lv)
           for lv in ("pixel", "mid", "high")},
        **{f"cv_drop_vs_full_pct_{lv}": ("cross_validation", "targets", "steps_saved_at_quality",
                                         "drop_vs_full_pct", lv) for lv in ("pixel", "mid", "high")},
    }),
    # The calibrated policy's default plan (what `auto` runs without a quality target).
    "calibrate_auto": ("reports/calibrate_auto.json", {
        "default_gflops_reduction": calibrate_default_gflops_reduction,
        "default_mean_nfe": calibrate_default(("measured", "mean_nfe")),
        "default_quality_mean": calibrate_default(("measured", "quality_mean")),
        "default_attr_acc_vs_full": calibrate_default(("measured", "attr_acc_vs_full", "mean")),
        "default_clipt_vs_full": calibrate_default(("measured", "clipt_vs_full", "mean")),
    }),
    "bench_auto": ("reports/auto.json", {
        "gflops_reduction": ("targets", "auto_gflops_reduction", "measured"),
        "gflops_reduction_met": ("targets", "auto_gflops_reduction", "met"),
        "attr_acc_minus_full": ("targets", "auto_attr_acc_within", "measured"),
        "attr_acc_within_met": ("targets", "auto_attr_acc_within", "met"),
        "clipt_minus_full": ("targets", "auto_clipt_within", "measured"),
        "clipt_within_met": ("targets", "auto_clipt_within", "met"),
        "engine_overhead_pct": ("targets", "engine_overhead", "measured_pct"),
        "engine_overhead_met": ("targets", "engine_overhead", "met"),
        "quality_target_promise_met": every(("calibration",), "promise_met"),
        "quality_target_lowest_share_reaching": lowest(("calibration",), "share_reaching_target"),
    }),
    "register": ("reports/registry.json", {
        "registered": ("registered",),
        "gate_promoted": gate_verdict_is("promoted"),
        "gate_refused": gate_verdict_is("refused"),
        "gate_checks_failed": gate_checks_failed,
        "challenger_gflops_per_image": gate_metric("cost/gflops_per_image"),
        "challenger_attr_acc": gate_metric("domain/attr_acc"),
        "challenger_clipt_domainclip": gate_metric("high/clipt_domainclip"),
        "challenger_ssim": gate_metric("pixel/ssim"),
        "challenger_lpips_alex_randinit": gate_metric("mid/lpips_alex_randinit"),
    }),
    "bench_serve": ("reports/serve.json", {
        "speedup_vs_naive": ("throughput", "speedup"),
        "overhead_ratio": ("overhead", "ratio"),
        "autoscale_met": ("autoscale", "met"),
        "overload_lost": ("overload", "lost"),
        "kill_met": ("kill", "met"),
        "bad_inputs_all_4xx": ("bad_inputs", "all_4xx_clear"),
        "mixed_probe_step_vs_alone": ("mixed", "summary", "probe_step_vs_alone"),
        "mixed_short_p95_vs_alone": ("mixed", "summary", "short_p95_vs_alone_max"),
        "mixed_short_p95_vs_request": ("mixed", "summary", "short_p95_vs_request_max"),
        "mixed_saturation_step_vs_request": ("mixed", "summary", "saturation_step_vs_request"),
    }),
    "bench_monitor": ("reports/monitor.json", {
        "latency_p95_ratio_shadow_on_off": ("latency", "p95_ratio_on_off"),
        "latency_target_met": ("latency", "target", "met"),
        "slo_normal_share_good": ("slo", "normal", "shadow", "share_good"),
        "quality_alert_silent_under_normal": ("slo", "target", "normal_silent"),
        "quality_alert_fired_under_degraded": ("slo", "target", "degraded_fires"),
        "slo_target_met": ("slo", "target", "met"),
        "drift_ood_mmd_pvalue": ("drift", "out_of_domain", "mmd_pvalue"),
        "drift_in_domain_false_positive_rate": ("drift", "in_domain", "false_positive_rate"),
        "drift_target_met": ("drift", "pass"),
    }),
    "tune_skip": ("reports/tune_skip.json", {
        "complete": ("complete",),
        **{f"{s}_holdout_target_met": ("schedulers", s, "holdout", "target", "met") for s in SCHEDULERS},
        **{f"{s}_holdout_nfe_speedup": ("schedulers", s, "holdout", "target", "nfe_speedup") for s in SCHEDULERS},
        **{f"{s}_holdout_lpips_alex_randinit": ("schedulers", s, "holdout", "target", "lpips") for s in SCHEDULERS},
    }),
}


# ----------------------------------------------------------------------------------------------
# The scorecard: the DVC metrics, in one small vocabulary shared by every stage
# ----------------------------------------------------------------------------------------------
# `dvc metrics show` draws one column per distinct key over all metrics files. The headlines use
# each report's own names (about 150 keys in all), so the declared metrics are scorecards instead:
# per stage, at most a few of its headlines under the same few words, so the table has one column
# per word and one row per stage. `targets_met` / `targets` count the stage's `*_met` headlines;
# reports/scorecard.md is the legend (which headline each word is, per stage).
WORDS = ("targets_met", "targets", "speedup", "quality", "accuracy", "loss", "throughput", "size")
_DISTILLED = {"accuracy": "all_attributes_at_sweep_best", "loss": "heldout_loss_dstl_cfg"}
SCORECARD: dict[str, dict[str, str]] = {
    "train_base": {"accuracy": "all_attributes_at_default_guidance", "loss": "final_train_loss"},
    "finetune_base": {"accuracy": "all_attributes_at_default_guidance"},
    "train_clip": {"accuracy": "held_out_image_to_text_top1", "loss": "final_train_loss"},
    "train_attributes": {"accuracy": "held_out_1obj_all_attributes", "loss": "final_train_loss"},
    "bench_metrics": {"accuracy": "attr_checker_1obj_all_attributes", "throughput": "all_metrics_images_per_s"},
    "bench_base": {"accuracy": "attr_acc_1obj"},
    **{stage: dict(_DISTILLED) for stage in HEADLINES if stage.startswith(("distill_16", "distill_8@"))},
    "bench_distill": {"speedup": "gflops_reduction_vs_teacher_50", "quality": "student_8_cfg_clipt_seed_mean",
                      "accuracy": "student_8_cfg_attr_acc"},
    "render": {"size": "images"},
    "bench_render": {"speedup": "speedup_2_vs_1_workers", "throughput": "network_evaluations_per_s_2_workers"},
    "pilot_detail": {"quality": "largest_detail_variance_kept_at_8"},
    "ablate_composition": {"accuracy": "objects_all_right_at_1_25"},
    "dataset": {"size": "rows"},
    "bench_adaptive": {"speedup": "ddim_nfe_speedup", "quality": "ddim_psnr"},
    "train_budget": {"loss": "bilstm_best_val_loss"},
    "bench_budget": {"quality": "cv_margin_vs_uniform_high"},
    "calibrate_auto": {"speedup": "default_gflops_reduction", "quality": "default_quality_mean"},
    "bench_auto": {"speedup": "gflops_reduction"},
    "register": {"quality": "challenger_ssim", "accuracy": "challenger_attr_acc"},
    "bench_serve": {"speedup": "speedup_vs_naive"},
    "bench_monitor": {},
    "tune_skip": {"speedup": "ddim_holdout_nfe_speedup", "quality": "ddim_holdout_lpips_alex_randinit"},
}


def target_keys(headlines: dict) -> list[str]:
    """The stage's targets: its ``*_met`` headlines (bools)."""
    return sorted(k for k, v in headlines.items() if k.endswith("_met") and isinstance(v, bool))


def scorecard_for(stage: str, headlines: dict) -> dict:
    """``stage``'s scorecard from its headlines: the words of ``SCORECARD[stage]`` and, when it has
    targets, how many are met. Every word names a headline the stage has (else ``HeadlineError``)."""
    if stage not in SCORECARD:
        raise HeadlineError(f"stage {stage}: no scorecard entry (add one to SCORECARD)")
    out = {}
    targets = target_keys(headlines)
    if targets:
        out["targets_met"], out["targets"] = sum(bool(headlines[k]) for k in targets), len(targets)
    for word, key in SCORECARD[stage].items():
        if word not in WORDS or word in ("targets_met", "targets"):
            raise HeadlineError(f"stage {stage}: scorecard word {word!r} is not one of {', '.join(WORDS[2:])}")
        if key not in headlines:
            raise HeadlineError(f"stage {stage}: scorecard word {word!r} names {key!r}, not one of its headlines")
        out[word] = headlines[key]
    if not out:
        raise HeadlineError(f"stage {stage}: an empty scorecard (give it targets or a word)")
    return {w: out[w] for w in WORDS if w in out}


def legend(table: dict | None = None) -> str:
    """reports/scorecard.md: per stage, the headline behind each word of its scorecard."""
    table = HEADLINES if table is None else table
    lines = ["# Scorecard legend", "",
             "`dvc metrics show` lists one scorecard per stage (`reports/scorecard/<stage>.json`, written by",
             "`python -m pipelines.headlines`). Each word is one of the stage's headlines",
             "(`reports/headlines/<stage>.json`), taken from its full report; `targets_met` / `targets` count",
             "its `*_met` headlines.", "",
             "| stage | report | " + " | ".join(WORDS[2:]) + " |", "|" + "---|" * (2 + len(WORDS[2:]))]
    for stage in table:
        words = SCORECARD.get(stage, {})
        lines.append(f"| {stage} | {table[stage][0]} | " + " | ".join(words.get(w, "") for w in WORDS[2:]) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Resolving and writing
# ----------------------------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _float_or_none(s: str) -> float | None:
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def _number(v: Any, path: Sequence) -> float:
    if not _is_number(v):
        raise HeadlineError(f"{format_path(path)} is {v!r}, not a finite number")
    return v


def round_significant(x: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """``x`` to ``digits`` significant digits (0.0 stays 0.0; -0.0 becomes 0.0)."""
    return float(f"{x:.{digits - 1}e}") + 0.0


def clean(value: Any) -> int | float | bool:
    """The headline value as written: bools and ints as they are, floats rounded; else ValueError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return round_significant(value)
    raise ValueError(f"{value!r} is not a finite number or a bool")


def headlines_for(stage: str, reports_dir: str | Path = "reports", table: dict | None = None) -> dict:
    """The headline dict of ``stage``, read from its report under ``reports_dir``."""
    table = HEADLINES if table is None else table
    if stage not in table:
        raise HeadlineError(f"unknown stage {stage!r} (known: {', '.join(sorted(table))})")
    report_path, spec = table[stage]
    path = Path(reports_dir) / Path(report_path).relative_to("reports")  # the table names reports/...
    if not path.is_file():
        raise HeadlineError(f"stage {stage}: report {path} is missing")
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HeadlineError(f"stage {stage}: report {path} is not readable JSON ({exc})") from None
    out = {}
    for key, source in spec.items():
        try:
            value = source(report) if callable(source) else dig(report, source)
            out[key] = clean(value)
        except MissingPath as exc:
            raise HeadlineError(f"stage {stage}: report {path} has no {format_path(exc.path)} "
                                f"(headline {key!r})") from None
        except (HeadlineError, ValueError, TypeError) as exc:
            where = "" if callable(source) else f" at {format_path(source)}"
            raise HeadlineError(f"stage {stage}: report {path}: headline {key!r}{where}: {exc}") from None
    if not MIN_KEYS <= len(out) <= MAX_KEYS:
        raise HeadlineError(f"stage {stage}: {len(out)} headlines, not {MIN_KEYS}-{MAX_KEYS}")
    return dict(sorted(out.items()))


def headline_file(stage: str) -> str:
    """``reports/headlines``' file name of a stage: a foreach member's ``@`` becomes ``-``
    (``distill_8@cfg`` -> ``distill_8-cfg.json``), as ``@`` names a revision on DVC's command line."""
    return stage.replace("@", "-") + ".json"


def write_headlines(stages: Sequence[str] | None = None, reports_dir: str | Path = "reports",
                    out_dir: str | Path = "reports/headlines", table: dict | None = None,
                    scorecard_dir: str | Path | None = None) -> list[Path]:
    """Resolve every stage first (nothing is written when one fails), then write each file
    atomically: the headlines under ``out_dir`` and, with ``scorecard_dir``, the scorecards there
    and the legend beside them (``<scorecard_dir>.md``)."""
    table = HEADLINES if table is None else table
    names = list(dict.fromkeys(stages)) if stages else list(table)
    resolved = {name: headlines_for(name, reports_dir, table) for name in names}
    cards = {name: scorecard_for(name, values) for name, values in resolved.items()} if scorecard_dir else {}
    written = []
    for name, values in resolved.items():
        target = Path(out_dir) / headline_file(name)
        atomic_write_json(target, values)
        written.append(target)
        if scorecard_dir:
            card = Path(scorecard_dir) / headline_file(name)
            atomic_write_json(card, cards[name])
            written.append(card)
    if scorecard_dir:
        atomic_write_bytes(Path(f"{scorecard_dir}.md"), legend(table).encode())
        written.append(Path(f"{scorecard_dir}.md"))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m pipelines.headlines", description=__doc__.splitlines()[0])
    parser.add_argument("--reports-dir", default="reports", help="where the full reports are (default: reports)")
    parser.add_argument("--out-dir", default="reports/headlines",
                        help="where to write <stage>.json (default: reports/headlines)")
    parser.add_argument("--scorecard-dir", default="reports/scorecard",
                        help="where to write each stage's scorecard, the DVC metric (default: reports/scorecard; "
                             "its legend goes to <dir>.md)")
    parser.add_argument("--stage", action="append", metavar="NAME",
                        help="write only this stage's headlines (repeatable; default: every stage)")
    args = parser.parse_args(argv)
    try:
        written = write_headlines(args.stage, args.reports_dir, args.out_dir, scorecard_dir=args.scorecard_dir)
    except HeadlineError as exc:
        return print_error(str(exc))
    print(json.dumps({"headlines": [str(p) for p in written]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
