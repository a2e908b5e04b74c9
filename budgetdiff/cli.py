"""The ``budgetdiff`` command.

    budgetdiff generate "PROMPT" [--mode full|budget|adaptive|student|auto] [--bundle DIR]
        [--model DIR] [--steps N|auto] [--quality-target Q] [--budget-model DIR]
        [--scheduler ddim|dpmpp|euler] [--guidance G] [--seed S] [--adaptive] [--threshold D]
        [--max-skip C] [--reuse SPACE] [--out FILE.png]
    budgetdiff batch PROMPTS.txt|.csv --out-dir DIR [--mode ...] [--batch-size N]
    budgetdiff score IMAGE [--ref REF.png] [--prompt TEXT] [--resize]
    budgetdiff drift PROMPT_LOG --out REPORT.html [--window N] [--alpha A] [--permutations P]

The last line on stdout is one JSON object. Bad arguments exit with status 2 and one line on
stderr naming the argument; never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

import typer

try:  # typer >= 0.20 vendors click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

DEFAULT_BUNDLE = os.environ.get("BUDGETDIFF_BUNDLE", "models/bundle")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compute-budgeted text-to-image diffusion.")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _check_output_path(out: Path) -> None:
    if out.suffix.lower() != ".png":
        raise CliError(f"--out: {str(out)!r} must end in .png")
    parent = out.resolve().parent
    if out.is_dir():
        raise CliError(f"--out: {str(out)!r} is a directory")
    if not parent.is_dir():
        raise CliError(f"--out: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise CliError(f"--out: {str(out)!r} cannot be written")


FIELD_FLAGS = {"steps": "--steps", "guidance": "--guidance", "scheduler": "--scheduler", "seed": "--seed",
               "mode": "--mode", "quality_target": "--quality-target", "quality-target": "--quality-target",
               "threshold": "--threshold", "max_skip": "--max-skip", "reuse": "--reuse", "warmup": "--warmup",
               "model": "--model", "budget": "--budget-model", "budget model": "--budget-model",
               "bundle": "--bundle", "skip policy": "--bundle"}


def _as_cli_error(exc: Exception) -> CliError:
    """A library ValueError ("field: message") as a one-line CLI error naming the flag."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    field_name, sep, rest = message.partition(":")
    flag = FIELD_FLAGS.get(field_name.strip())
    return CliError(f"{flag}:{rest}" if sep and flag else message)


def _resolve_mode(mode: str | None, steps: str | None, adaptive: bool, quality_target: float | None
                  ) -> tuple[str, int | None, bool]:
    """(mode, steps, skip at the budget's steps): the mode a command line asks for, old flags
    included (``--steps auto`` is budget mode; ``--adaptive`` is adaptive mode)."""
    from .engine import MODES

    if mode is not None and mode not in MODES:
        raise CliError(f"--mode: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    auto_steps = steps is not None and steps.strip().lower() == "auto"
    n_steps = None
    if steps is not None and not auto_steps:
        try:
            n_steps = int(steps)
        except ValueError:
            raise CliError(f"--steps: must be an integer or 'auto', got {steps!r}") from None
    if quality_target is not None and not (math.isfinite(quality_target) and 0 < quality_target <= 1):
        raise CliError(f"--quality-target: must be in (0, 1], got {quality_target}")
    budget_then_skip = False
    if mode is None:
        if auto_steps:
            mode, budget_then_skip = "budget", adaptive
        elif adaptive:
            mode = "adaptive"
        elif n_steps is not None:
            mode = "full"
        else:
            mode = "auto"
    elif auto_steps and mode not in ("budget", "auto"):
        raise CliError(f"--steps: 'auto' chooses the steps (modes budget and auto), not mode {mode}")
    elif adaptive and mode != "adaptive":
        raise CliError(f"--adaptive: skipping is mode adaptive (or auto's base route), not mode {mode}")
    if quality_target is not None and mode in ("full", "student"):
        raise CliError(f"--quality-target: only applies with modes budget, adaptive and auto (or --steps auto), "
                       f"not {mode}")
    if n_steps is not None and mode not in ("full", "adaptive"):
        raise CliError(f"--steps: mode {mode} chooses its own step count")
    return mode, n_steps, budget_then_skip


def _skip_override(threshold: float | None, max_skip: int | None, reuse: str | None, warmup: int | None):
    """An explicit skip configuration from the flags given, or None to use the shipped policy."""
    if threshold is None and max_skip is None and reuse is None and warmup is None:
        return None
    from .adaptive import AdaptiveSkipConfig

    base = AdaptiveSkipConfig()
    try:
        return AdaptiveSkipConfig(threshold=base.threshold if threshold is None else threshold,
                                  max_skip=base.max_skip if max_skip is None else max_skip,
                                  warmup=base.warmup if warmup is None else warmup,
                                  reuse=base.reuse if reuse is None else reuse)
    except ValueError as exc:
        raise _as_cli_error(exc) from None


def build_generator(bundle: str, model: str | None, budget_model: str | None, need_budget: bool):
    """The engine for a command line: the bundle's models, with ``--model`` / ``--budget-model``
    replacing its base model / budget predictor when given. Returns (generator, model path)."""
    from .bundle import BundleError, load_bundle
    from .engine import Generator
    from .generation import ModelDirectoryError, load_pipeline, model_class_name

    if model is not None:
        try:
            model_class_name(model)
        except ModelDirectoryError as exc:
            raise _as_cli_error(exc) from None
    try:
        spec = load_bundle(bundle)
    except BundleError as exc:
        if model is None or need_budget and budget_model is None:
            raise CliError(f"--bundle: {str(exc).removeprefix('bundle: ')}") from None
        spec = None
    if model is None or spec is not None and Path(model).resolve() == Path(spec.base).resolve():
        if budget_model is None:
            try:
                return Generator.load(bundle), spec.base
            except BundleError as exc:
                raise CliError(f"--bundle: {str(exc).removeprefix('bundle: ')}") from None
        model = spec.base
    predictor = _load_budget_model(budget_model or spec.budget, model) if need_budget else None
    try:
        base = load_pipeline(model)
    except ModelDirectoryError as exc:
        raise _as_cli_error(exc) from None
    student = None
    if spec is not None and spec.student is not None:
        student = load_pipeline(spec.student.path)
    from .pipeline import BudgetDiffusionPipeline

    if not isinstance(base, BudgetDiffusionPipeline):
        return base, model  # a stock SD / SDXL pipeline: full and adaptive through budgetdiff.generation
    kwargs = {}
    if spec is not None:
        kwargs = dict(student_steps=spec.student.steps if spec.student else 8,
                      student_guidance=spec.student.guidance if spec.student else None,
                      plateau_epsilon=spec.plateau_epsilon if budget_model is None else None,
                      auto_student_max_steps=spec.auto.student_max_steps if spec.auto else None,
                      auto_student_guidance=spec.auto.student_guidance if spec.auto else None,
                      base_steps=spec.base_steps, base_scheduler=spec.base_scheduler, bundle=spec)
    return Generator(base, student, predictor=predictor, skip_policy=spec.skip_policy if spec else None,
                     model_paths={"base": model, "student": spec.student.path if spec and spec.student else None},
                     **kwargs), model


def _cli_record(record: dict) -> dict:
    """The engine's record as the CLI prints it: ``model`` is the model directory."""
    info = record.get("model") or {}
    return {**record, "model": info.get("path"), "model_role": info.get("name"), "unet_sha256": info.get("unet_sha256")}


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The text prompt."),
    mode: Optional[str] = typer.Option(None, "--mode", help="full, budget, adaptive, student or auto (default: auto; --steps N means full, --steps auto budget, --adaptive adaptive)."),
    bundle: str = typer.Option(DEFAULT_BUNDLE, "--bundle", help="Model bundle directory (base, student, budget predictor, skip policy): `dvc repro bundle` writes models/bundle."),
    model: Optional[str] = typer.Option(None, "--model", help="Diffusers model directory instead of the bundle's base: the embedded model, or a local SD 1.5 / SDXL (modes full and adaptive)."),
    steps: Optional[str] = typer.Option(None, "--steps", help="Denoising steps, 1..1000 (modes full, adaptive; default 50), or 'auto': chosen for this prompt by the budget predictor."),
    quality_target: Optional[float] = typer.Option(None, "--quality-target", help="Modes budget, adaptive, auto: the least quality, as a fraction (0, 1] of the full-step image's, to reach (default: the plateau rule / the default skip point)."),
    budget_model: Optional[str] = typer.Option(None, "--budget-model", help="Budget predictor directory instead of the bundle's."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="ddim, dpmpp or euler (default: the bundle's)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale (default: what the mode was measured at)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    out: Path = typer.Option(Path("out.png"), "--out", help="Where to write the PNG."),
    upscale: int = typer.Option(1, "--upscale", help="Also enlarge the PNG by this integer factor (nearest), for viewing."),
    adaptive: bool = typer.Option(False, "--adaptive", help="Skip redundant noise predictions (AdaptiveDiffusion) with the shipped skip policy."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Adaptive: skip threshold δ instead of the shipped policy's (>= 0; 0 skips nothing)."),
    max_skip: Optional[int] = typer.Option(None, "--max-skip", help="Adaptive: most consecutive skipped predictions, C_max, instead of the policy's."),
    reuse: Optional[str] = typer.Option(None, "--reuse", help="Adaptive: what a skipped step reuses (epsilon, output, sample) instead of the policy's."),
) -> None:
    """Generate one image; the last stdout line is a JSON record."""
    from .engine import GenerationRequest

    mode, n_steps, budget_then_skip = _resolve_mode(mode, steps, adaptive, quality_target)
    if guidance is not None and not math.isfinite(guidance):
        raise CliError(f"--guidance: must be finite, got {guidance}")
    if upscale < 1:
        raise CliError(f"--upscale: must be >= 1, got {upscale}")
    skip = _skip_override(threshold, max_skip, reuse, None)
    if skip is not None and mode != "adaptive" and not budget_then_skip:
        raise CliError(f"--threshold: explicit skip settings apply to mode adaptive, not {mode}")
    request = GenerationRequest(prompt, mode=mode, steps=n_steps, quality_target=quality_target,
                                scheduler=scheduler, guidance=guidance, seed=seed,
                                skip=skip if mode == "adaptive" else None)
    try:
        request.validate()
    except ValueError as exc:
        raise _as_cli_error(exc) from None
    _check_output_path(out)
    gen, model_path = build_generator(bundle, model, budget_model, need_budget=mode in ("budget", "auto"))
    try:
        if not hasattr(gen, "plan"):
            record, image = _generate_stock(gen, request, model_path)
        else:
            budget = None
            if budget_then_skip:  # old flags --steps auto --adaptive: the budget's steps, then skipping
                budget = gen.plan([request])[0].info["budget"]
                request = GenerationRequest(prompt, mode="adaptive", steps=budget["chosen_steps"],
                                            quality_target=quality_target, scheduler=scheduler, guidance=guidance,
                                            seed=seed, skip=skip)
            result = gen(request, progress=False)[0]
            record, image = _cli_record(result.record), result.image
            if budget is not None:
                record["budget"] = budget
    except ValueError as exc:
        raise _as_cli_error(exc) from None
    for note in (record.get("budget") or {}).get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if record.get("budget") is not None:
        record["steps_auto"] = True
    if upscale > 1:
        from PIL import Image

        image = image.resize((image.width * upscale, image.height * upscale), Image.Resampling.NEAREST)
    _write_png(out, image)
    print(json.dumps({**record, "out": str(out)}))


def _write_png(out: Path, image) -> None:
    from .io import atomic_write_bytes, png_bytes

    atomic_write_bytes(out, png_bytes(image))


def _generate_stock(pipe, request, model_path: str):
    """Modes full and adaptive on a stock SD / SDXL pipeline (budgetdiff.generation)."""
    from .adaptive import AdaptiveSkipConfig
    from .generation import generate as run

    if request.mode not in ("full", "adaptive"):
        raise CliError(f"--mode: {request.mode} needs the embedded model's bundle; a stock SD/SDXL model runs "
                       "modes full and adaptive")
    skip = request.skip or (AdaptiveSkipConfig() if request.mode == "adaptive" else None)
    images, records = run(pipe, [request.prompt], steps=request.steps or 50, guidance=request.guidance,
                          scheduler=request.scheduler, seed=request.seed, progress=sys.stderr.isatty(), adaptive=skip)
    return {**records[0], "mode": request.mode, "model": str(model_path)}, images[0]


@app.command()
def batch(
    prompts_file: Path = typer.Argument(..., help="Prompt file: one prompt per line (.txt) or a CSV with a 'prompt' column (optional columns: seed, mode, quality_target)."),
    out_dir: Path = typer.Option(..., "--out-dir", help="Folder for the PNGs and records.jsonl (created if missing)."),
    mode: str = typer.Option("auto", "--mode", help="full, budget, adaptive, student or auto (a CSV 'mode' column overrides it per prompt)."),
    bundle: str = typer.Option(DEFAULT_BUNDLE, "--bundle", help="Model bundle directory."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Steps for modes full and adaptive."),
    quality_target: Optional[float] = typer.Option(None, "--quality-target", help="Quality target for modes budget, adaptive, auto."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="ddim, dpmpp or euler."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first prompt; prompt i uses seed + i unless the CSV gives one."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per pipeline call."),
) -> None:
    """Generate one image per prompt of a file into a folder, with one JSON record per image in
    records.jsonl. Re-running skips images already written, so an interrupted run resumes."""
    from .engine import GenerationRequest
    from .prompt_files import PromptFileError, read_prompt_file

    if batch_size < 1:
        raise CliError(f"--batch-size: must be >= 1, got {batch_size}")
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"--out-dir: {str(out_dir)!r} is not a directory")
    try:
        read = read_prompt_file(prompts_file)
    except PromptFileError as exc:
        raise CliError(f"PROMPTS_FILE: {exc}") from None
    for bad in read.rejected:
        print(f"note: skipped {bad}", file=sys.stderr)
    extra = _csv_extras(prompts_file) if prompts_file.suffix.lower() == ".csv" else {}
    requests = []
    for i, line in enumerate(read.prompts):
        row = extra.get(line.line, {})
        try:
            request = GenerationRequest(
                line.text, mode=row.get("mode") or mode, steps=steps,
                quality_target=float(row["quality_target"]) if row.get("quality_target") else quality_target,
                scheduler=scheduler, guidance=guidance, seed=int(row["seed"]) if row.get("seed") else seed + i,
                request_id=f"{prompts_file.name}:{line.line}")
            request.validate()
        except ValueError as exc:
            raise CliError(f"{prompts_file}:{line.line}: {_as_cli_error(exc)}") from None
        requests.append(request)
    out_dir.mkdir(parents=True, exist_ok=True)
    records_path = out_dir / "records.jsonl"
    done = _finished_images(records_path, out_dir)
    todo = [(i, r) for i, r in enumerate(requests) if _image_name(i, r) not in done]
    print(f"{len(requests)} prompts, {len(requests) - len(todo)} already done, {len(todo)} to generate",
          file=sys.stderr)
    if not todo:
        print(json.dumps({"images": len(requests), "generated": 0, "out_dir": str(out_dir)}))
        return
    need_budget = any(r.mode in ("budget", "auto") for _, r in todo)
    gen, _ = build_generator(bundle, None, None, need_budget)
    from tqdm import tqdm

    generated = nfe = 0
    with tqdm(total=len(todo), desc="batch", unit="image", disable=None) as bar:
        for start in range(0, len(todo), batch_size * 4):  # write after each slice: little lost on interrupt
            chunk = todo[start:start + batch_size * 4]
            try:
                results = gen([r for _, r in chunk], batch_size=batch_size, progress=bar.update)
            except ValueError as exc:
                raise _as_cli_error(exc) from None
            with open(records_path, "a") as log:
                for (i, r), result in zip(chunk, results):
                    name = _image_name(i, r)
                    _write_png(out_dir / name, result.image)
                    log.write(json.dumps({**_cli_record(result.record), "image": name}) + "\n")
                    generated += 1
                    nfe += result.record["nfe"]
    print(json.dumps({"images": len(requests), "generated": generated, "mean_nfe": round(nfe / generated, 3),
                      "out_dir": str(out_dir), "records": str(records_path)}))


def _image_name(index: int, request) -> str:
    return f"{index:05d}_seed{request.seed}.png"


def _finished_images(records_path: Path, out_dir: Path) -> set[str]:
    """Images with both a PNG and a record (a record written without its PNG, or the other way
    round, is redone)."""
    if not records_path.is_file():
        return set()
    names = set()
    for line in records_path.read_text().splitlines():
        try:
            names.add(json.loads(line)["image"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by an interrupted write
    return {n for n in names if (out_dir / n).is_file()}


def _csv_extras(path: Path) -> dict[int, dict]:
    """Per CSV line: the optional seed, mode and quality_target columns."""
    import csv

    rows = {}
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            for row in reader:
                rows[reader.line_num] = {k: (row.get(k) or "").strip() for k in ("seed", "mode", "quality_target")}
    except OSError:
        return {}
    return rows


def _load_budget_model(path: str, model: str):
    """The budget predictor at ``path``, checked against ``model`` before anything heavy loads."""
    from .budget import BudgetModelError, load_budget_predictor
    from .generation import ModelDirectoryError, model_class_name

    try:
        model_class_name(model)
    except ModelDirectoryError as exc:
        raise CliError(f"--{exc}") from None
    try:
        predictor = load_budget_predictor(path)
        predictor.check_model(model)
    except BudgetModelError as exc:
        raise CliError(f"--budget-model: {exc}") from None
    return predictor


def _load_image(path: Path, argument: str):
    """Open ``path`` as an RGB PIL image, or raise a one-line CliError naming ``argument``."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise CliError(f"{argument}: {str(path)!r} does not exist")
    if path.is_dir():
        raise CliError(f"{argument}: {str(path)!r} is a directory, not an image")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise CliError(f"{argument}: {str(path)!r} is not a readable image file") from None


@app.command()
def score(
    image: Path = typer.Argument(..., help="The image to judge (PNG, JPEG, ...)."),
    ref: Optional[Path] = typer.Option(None, "--ref", help="Reference image: enables PSNR, SSIM, LPIPS, I-CLIP."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt: enables CLIP-T and, for scene prompts, attr_acc."),
    resize: bool = typer.Option(False, "--resize", help="Resize IMAGE to the reference's size when they differ."),
    clip_dir: Optional[str] = typer.Option(None, "--clip-dir", help="Domain CLIP directory (default models/clip)."),
    attributes_dir: Optional[str] = typer.Option(None, "--attributes-dir", help="Attribute checker directory (default models/attributes)."),
    alexnet_weights: Optional[str] = typer.Option(None, "--alexnet-weights", help="Local ImageNet AlexNet checkpoint for LPIPS."),
) -> None:
    """Print every metric that applies; the last stdout line is {metric name: value}.

    A model directory left at its default and missing is skipped with a note on stderr; one
    given explicitly must exist.
    """
    import warnings

    from .evaluators import ATTRIBUTE_CHECKER_DIR, DOMAIN_CLIP_DIR, EvaluatorModelError
    from .scenes import PromptParseError, parse_prompt

    if prompt is not None and not prompt.strip():
        raise CliError("--prompt: must not be empty (CLIP-T needs text)")
    for argument, path in (("--clip-dir", clip_dir), ("--attributes-dir", attributes_dir)):
        if path is not None and not Path(path).is_dir():
            raise CliError(f"{argument}: directory {path!r} does not exist")
    if alexnet_weights is not None and not Path(alexnet_weights).is_file():
        raise CliError(f"--alexnet-weights: {alexnet_weights!r} does not exist")
    picture = _load_image(image, "IMAGE")
    reference = _load_image(ref, "--ref") if ref is not None else None
    if reference is not None and picture.size != reference.size and not resize:
        raise CliError(f"--ref: reference is {reference.width}x{reference.height} but IMAGE is "
                       f"{picture.width}x{picture.height}; pass --resize to resize IMAGE to the reference")

    from .metrics import MetricScorer, ScoringConfig

    config = ScoringConfig(clip_dir=clip_dir or DOMAIN_CLIP_DIR, attributes_dir=attributes_dir or ATTRIBUTE_CHECKER_DIR,
                           alexnet_weights=alexnet_weights, skip_missing_models=True)
    scorer = MetricScorer(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            values = scorer.score_one(picture, reference, prompt, resize=resize)
        except EvaluatorModelError as exc:  # pragma: no cover - explicit dirs are checked above
            raise CliError(str(exc)) from None
        except ValueError as exc:
            raise CliError(str(exc)) from None
    explicit = {"clip": clip_dir, "checker": attributes_dir}
    for key, message in scorer.missing_models.items():
        if explicit[key] is not None:
            raise CliError(f"--{'clip-dir' if key == 'clip' else 'attributes-dir'}: {message}")
        print(f"note: {message}; its metrics are left out", file=sys.stderr)
    for warning in caught:
        if "model directory" not in str(warning.message):
            print(f"note: {warning.message}", file=sys.stderr)
    if prompt is not None and "domain/attr_acc" in values and values["domain/attr_acc"] != values["domain/attr_acc"]:
        del values["domain/attr_acc"]  # NaN: the prompt is not a scene-domain prompt
        try:
            parse_prompt(prompt)
        except PromptParseError as exc:
            print(f"note: domain/attr_acc left out: {exc}", file=sys.stderr)
    print(json.dumps({k: round(v, 6) for k, v in values.items()}))


@app.command()
def drift(
    prompt_log: Path = typer.Argument(..., help="Served prompts: .txt (one per line) or .jsonl (records with a 'prompt' key, e.g. batch's records.jsonl)."),
    out: Path = typer.Option(..., "--out", help="The HTML report to write (.html)."),
    window: int = typer.Option(100, "--window", help="Prompts per tested window (>= 10)."),
    alpha: float = typer.Option(0.01, "--alpha", help="Family-wise level: a window is flagged when min(p_MMD, p_C2ST) < alpha/2."),
    permutations: int = typer.Option(999, "--permutations", help="MMD permutations per window."),
    seed: int = typer.Option(0, "--seed", help="Seed of the permutations and classifier splits."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Reference prompts (.txt/.jsonl) instead of the budget predictor's training prompts."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml that the training prompts are regenerated from."),
) -> None:
    """Test served prompts for drift from the budget predictor's training prompts (kernel MMD and
    classifier two-sample tests per window) and write an HTML report; the last stdout line is a
    JSON summary."""
    from .drift import MIN_WINDOW, PromptLogError, ReportWriteError, drift_report, read_prompt_log, reference_prompts

    if window < MIN_WINDOW:
        raise CliError(f"--window: must be >= {MIN_WINDOW}, got {window}")
    if not (0 < alpha < 1):
        raise CliError(f"--alpha: must be in (0, 1), got {alpha}")
    if permutations < 1:
        raise CliError(f"--permutations: must be >= 1, got {permutations}")
    if out.suffix.lower() not in (".html", ".htm"):
        raise CliError(f"--out: {str(out)!r} must end in .html")
    if out.is_dir():
        raise CliError(f"--out: {str(out)!r} is a directory")
    if not out.resolve().parent.is_dir():
        raise CliError(f"--out: directory {str(out.resolve().parent)!r} does not exist")
    try:
        prompts, skipped = read_prompt_log(prompt_log)
    except PromptLogError as exc:
        raise CliError(f"PROMPT_LOG: {exc}") from None
    if len(prompts) < MIN_WINDOW:
        raise CliError(f"PROMPT_LOG: {len(prompts)} prompt(s) in {prompt_log}, the drift tests need at least {MIN_WINDOW}")
    if skipped:
        print(f"note: skipped {skipped} line(s) of {prompt_log} without a 'prompt' string", file=sys.stderr)
    if 1 / (1 + permutations) >= alpha / 2:
        print(f"note: with {permutations} permutations the smallest MMD p-value is {1 / (1 + permutations):.3g}, "
              f"not below alpha/2 = {alpha / 2:g}: only the classifier test can flag a window", file=sys.stderr)
    if reference is not None:
        try:
            ref_prompts, _ = read_prompt_log(reference)
        except PromptLogError as exc:
            raise CliError(f"--reference: {exc}") from None
        source = str(reference)
    else:
        try:
            ref_prompts = reference_prompts(params)
        except ValueError as exc:
            message = str(exc).splitlines()[0]
            raise CliError(f"--params: {message.removeprefix('params: ')}") from None
        source = f"the budget predictor's training prompts, regenerated from {params}"
    if len(ref_prompts) < MIN_WINDOW:
        raise CliError(f"--reference: {len(ref_prompts)} prompt(s), need at least {MIN_WINDOW}")
    try:
        summary = drift_report(prompts, ref_prompts, out, window=window, alpha=alpha, n_permutations=permutations,
                               seed=seed, prompt_log=str(prompt_log), reference_source=source)
    except ReportWriteError as exc:
        raise CliError(f"--out: {exc}") from None
    except ValueError as exc:
        raise _as_cli_error(exc) from None
    print(f"{summary['flagged_windows']} of {summary['windows']} window(s) flagged at alpha {alpha:g} -> {out}",
          file=sys.stderr)
    print(json.dumps(summary))


@app.callback()
def _root() -> None:
    """Compute-budgeted text-to-image diffusion."""


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one-line errors, status 2 for bad arguments."""
    try:
        app(args=argv, standalone_mode=False, prog_name="budgetdiff")
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except click_exceptions.NoArgsIsHelpError:
        return 0
    except click_exceptions.UsageError as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        return 2
    except click_exceptions.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except click_exceptions.Exit as exc:
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _entry() -> None:
    sys.exit(main())
