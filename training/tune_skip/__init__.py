"""Stage ``tune_skip``: Ray Tune searches AdaptiveDiffusion's skip settings per scheduler and
writes the skip policy that the engine ships.

For each scheduler, a ``ray.tune.Tuner`` with Optuna's multi-objective TPE sampler
(``OptunaSearch(metric=["nfe", "lpips"], mode=["min", "min"])``) searches

    δ (``threshold``, log-uniform), C_max (``max_skip``, integer), the reuse space
    ("epsilon" / "sample" / "output") and the warm-up (integer >= 4)

on tuning prompts of their own (scene seeds from ``seed_offset``, a range no benchmark or
validation set uses). Each trial renders every tuning prompt at ``steps`` steps in one batched
pipeline call and is judged against the full-step image of the same prompt, seed, scheduler and
guidance (computed once per scheduler, shared with the trials through Ray's object store):
objective 1 is the mean NFE, objective 2 the mean LPIPS (under its backend's name in the report).

From the Pareto front of the Optuna trials, the selection rule in params picks a default point
(the front point that beats the ``baseline`` configuration — bench_adaptive's hand-tuned δ = 0.1
row — on both objectives by the largest margin) and one point per quality level (the fewest NFE
whose quality, ``budgetdiff.statistics.quality.realised_quality`` against the full-step image, reaches the level).
With ``selection.confirm`` set, the default is confirmed before it ships: the front points that
beat the baseline on the tuning prompts (at most ``candidates`` of them, by margin) and the
baseline itself are re-rendered on a confirmation set of their own (another seed range), and the
default becomes the candidate that still beats the baseline there by the largest margin, or the
baseline when none does. Twelve tuning prompts are few; a point picked on them alone can be a
lucky draw (it happened on Euler: 3.85x at better LPIPS on the tuning prompts, worse LPIPS held out).
They go to ``models/skip_policy/skip_policy.json`` (``budgetdiff-skip-policy/1``).

Then the held-out check: the default point of each scheduler on ``bench_adaptive``'s prompts,
against the hand-tuned row of ``reports/adaptive.json``; and the ablation: the same tuning with
Optuna's ``RandomSampler`` (same seed, same trial budget), compared by the hypervolume of the two
fronts. Trials are Ray Tune trials with declared CPUs, so the stage runs unchanged on an existing
cluster (``RAY_ADDRESS``); without it, a private local Ray is started. MLflow gets one parent run
and one child run per trial, logged from the driver after the tuning.

Writes reports/tune_skip.json, reports/tune_skip_pareto.png and the policy file. Every phase is
checkpointed under ``work_dir``, so an interrupted run resumes where it stopped.

The package, in the order the stage runs: ``params`` (validation, baselines), ``checkpoints``,
``trials`` (what runs in the Ray workers: render and judge), ``search`` (the Tune runs, the Pareto
front and the selection rule), ``confirm`` (confirmation and held-out check), ``report`` (policy
file, report, plot, ablation, MLflow) and ``stage`` (``tune`` and the command line).
"""

from .stage import main, tune

__all__ = ["main", "tune"]
