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
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from budgetdiff.errors import RequestError

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


def _flag(field_name: str) -> str:
    """The command-line argument of a request field: ``quality_target`` -> ``--quality-target``;
    the prompt is the positional ``prompt``."""
    return "prompt" if field_name == "prompt" else "--" + field_name.replace("_", "-")


def _request_error(exc: RequestError) -> CliError:
    """A ``RequestError`` as a one-line CLI error naming the flag of its field."""
    return CliError(f"{_flag(exc.field)}: {exc.message}")


def _bundle_error(exc) -> CliError:
    """A ``BundleError`` as a one-line CLI error naming the flag of the part at fault."""
    return CliError(f"{_flag(exc.part)}: {exc.detail}")


def _parse_steps(mode: str | None, steps: str | None, adaptive: bool) -> tuple[str, int | None, bool]:
    """(mode, steps, skip at the budget's steps): the mode a command line asks for, old flags
    included (``--steps auto`` is budget mode; ``--adaptive`` is adaptive mode). Only the flags'
    syntax and combinations are checked here; the request's own rules are ``GenerationRequest``'s."""
    auto_steps = steps is not None and steps.strip().lower() == "auto"
    n_steps = None
    if steps is not None and not auto_steps:
        try:
            n_steps = int(steps)
        except ValueError:
            raise CliError(f"--steps: must be an integer or 'auto', got {steps!r}") from None
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
    return mode, n_steps, budget_then_skip


def _skip_override(threshold: float | None, max_skip: int | None, reuse: str | None, warmup: int | None):
    """An explicit skip configuration from the flags given, or None to use the shipped policy."""
    if threshold is None and max_skip is None and reuse is None and warmup is None:
        return None
    from budgetdiff.methods.adaptive import AdaptiveSkipConfig

    base = AdaptiveSkipConfig()
    try:
        return AdaptiveSkipConfig(threshold=base.threshold if threshold is None else threshold,
                                  max_skip=base.max_skip if max_skip is None else max_skip,
                                  warmup=base.warmup if warmup is None else warmup,
                                  reuse=base.reuse if reuse is None else reuse)
    except RequestError as exc:
        raise _request_error(exc) from None


def _load_bundle_or_none(bundle: str, model: str | None, budget_model: str | None, need_budget: bool):
    """The bundle, or None when it cannot load and the command does not need it (a ``--model``
    running full / adaptive, or budget with ``--budget-model``)."""
    from budgetdiff.generation.bundle import BundleError, load_bundle

    try:
        return load_bundle(bundle)
    except BundleError as exc:
        if model is None or need_budget and budget_model is None:
            raise _bundle_error(exc) from None
        return None


def _generator(bundle, model: str | None = None, budget_model: str | None = None):
    """``Generator.from_bundle`` with its errors as one CLI line naming the flag."""
    from budgetdiff.generation.bundle import BundleError
    from budgetdiff.generation.engine import Generator

    try:
        return Generator.from_bundle(bundle, model=model, budget_model=budget_model)
    except BundleError as exc:
        raise _bundle_error(exc) from None


def _cli_record(record) -> dict:
    """The engine's record as the CLI prints it: ``model`` is the model directory."""
    d = record.to_dict()
    return {**d, "model": record.model.path, "model_role": record.model.name, "unet_sha256": record.model.unet_sha256}


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
    from budgetdiff.generation.engine import MODES, GenerationRequest

    if mode is not None and mode not in MODES:  # before --steps, whose rules depend on the mode
        raise CliError(f"--mode: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    mode, n_steps, budget_then_skip = _parse_steps(mode, steps, adaptive)
    if upscale < 1:
        raise CliError(f"--upscale: must be >= 1, got {upscale}")
    skip = _skip_override(threshold, max_skip, reuse, None)
    if skip is not None and mode != "adaptive" and not budget_then_skip:
        raise CliError(f"--threshold: explicit skip settings apply to mode adaptive, not {mode}")
    try:
        request = GenerationRequest(prompt, mode=mode, steps=n_steps, quality_target=quality_target,
                                    scheduler=scheduler, guidance=guidance, seed=seed,
                                    skip=skip if mode == "adaptive" else None)
    except RequestError as exc:
        raise _request_error(exc) from None
    _check_output_path(out)
    if model is not None and _is_stock(model):
        record, image = _generate_stock(model, request)
    else:
        spec = _load_bundle_or_none(bundle, model, budget_model, need_budget=mode in ("budget", "auto"))
        gen = _generator(spec, model, budget_model)
        try:
            budget = None
            if budget_then_skip:  # old flags --steps auto --adaptive: the budget's steps, then skipping
                budget = gen.plan([request])[0].budget
                request = GenerationRequest(prompt, mode="adaptive", steps=budget.chosen_steps, scheduler=scheduler,
                                            guidance=guidance, seed=seed, skip=skip,
                                            quality_target=quality_target)
            result = gen(request, progress=False)[0]
        except RequestError as exc:
            raise _request_error(exc) from None
        record, image = _cli_record(result.record), result.image
        if budget is not None:
            record["budget"] = budget.to_dict()
    for note in (record.get("budget") or {}).get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if record.get("budget") is not None:
        record["steps_auto"] = True
    if upscale > 1:
        from PIL import Image

        image = image.resize((image.width * upscale, image.height * upscale), Image.Resampling.NEAREST)
    _write_png(out, image)
    print(json.dumps({**record, "out": str(out)}))


def _is_stock(model: str) -> bool:
    """True for a stock SD / SDXL directory (run through budgetdiff.generation.loading, not the engine)."""
    from budgetdiff.generation.loading import ModelDirectoryError, model_class_name
    from budgetdiff.generation.pipeline import BudgetDiffusionPipeline

    try:
        return model_class_name(model) != BudgetDiffusionPipeline.__name__
    except ModelDirectoryError as exc:
        raise CliError(f"--model: {str(exc).removeprefix('model: ')}") from None


def _write_png(out: Path, image) -> None:
    from budgetdiff.io import atomic_write_bytes, png_bytes

    atomic_write_bytes(out, png_bytes(image))


def _generate_stock(model: str, request):
    """Modes full and adaptive on a stock SD / SDXL pipeline (budgetdiff.generation.loading)."""
    from budgetdiff.methods.adaptive import AdaptiveSkipConfig
    from budgetdiff.generation.loading import ModelDirectoryError, generate as run, load_pipeline

    if request.mode not in ("full", "adaptive"):
        raise CliError(f"--mode: {request.mode} needs the embedded model's bundle; a stock SD/SDXL model runs "
                       "modes full and adaptive")
    try:
        pipe = load_pipeline(model)
    except ModelDirectoryError as exc:
        raise CliError(f"--model: {str(exc).removeprefix('model: ')}") from None
    skip = request.skip or (AdaptiveSkipConfig() if request.mode == "adaptive" else None)
    images, records = run(pipe, [request.prompt], steps=request.steps or 50, guidance=request.guidance,
                          scheduler=request.scheduler, seed=request.seed, progress=sys.stderr.isatty(), adaptive=skip)
    return {**records[0], "mode": request.mode, "model": str(model)}, images[0]


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
    batch_size: int = typer.Option(16, "--batch-size", help="Guided images per UNet call (step-level batching: any plans share calls)."),
) -> None:
    """Generate one image per prompt of a file into a folder, with one JSON record per image in
    records.jsonl, written as each image finishes (so in finishing order; the image name carries
    the prompt's line index). Re-running skips images already written, so an interrupted run
    resumes."""
    from budgetdiff.generation.engine import GenerationRequest
    from budgetdiff.io.prompt_files import PromptFileError, read_prompt_file

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
            q = float(row["quality_target"]) if row.get("quality_target") else quality_target
            row_seed = int(row["seed"]) if row.get("seed") else seed + i
        except ValueError:
            raise CliError(f"{prompts_file}:{line.line}: quality_target and seed must be numbers") from None
        try:
            request = GenerationRequest(line.text, mode=row.get("mode") or mode, steps=steps, quality_target=q,
                                        scheduler=scheduler, guidance=guidance, seed=row_seed,
                                        request_id=f"{prompts_file.name}:{line.line}")
        except RequestError as exc:
            raise CliError(f"{prompts_file}:{line.line}: {_request_error(exc)}") from None
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
    gen = _generator(_load_bundle_or_none(bundle, None, None, True))
    from tqdm import tqdm

    from budgetdiff.generation.continuous import StepBatchConfig, StepBatcher

    # One step scheduler over every image: requests of any plan share UNet calls, and each image
    # is written the moment it is done, so an interrupted run loses only those in flight.
    batcher = StepBatcher(StepBatchConfig(max_rows=2 * batch_size, max_inflight=2 * batch_size))
    counts = {"generated": 0, "nfe": 0}
    with tqdm(total=len(todo), desc="batch", unit="image", disable=None) as bar, open(records_path, "a") as log:
        def write(j: int, result) -> None:
            i, r = todo[j]
            name = _image_name(i, r)
            _write_png(out_dir / name, result.image)
            log.write(json.dumps({**_cli_record(result.record), "image": name}) + "\n")
            log.flush()
            counts["generated"] += 1
            counts["nfe"] += result.record.nfe
            bar.update(1)

        try:
            ticket = batcher.submit(gen, [r for _, r in todo], on_image=write)
        except RequestError as exc:
            line = todo[exc.index][1].request_id if exc.index is not None else None
            raise CliError(f"{line}: {_request_error(exc)}" if line else str(_request_error(exc))) from None
        batcher.run_until_idle()
        ticket.future.result(timeout=0)
    generated, nfe = counts["generated"], counts["nfe"]
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
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt: enables CLIP-T and, for scene prompts, attr_acc over the attributes it states."),
    resize: bool = typer.Option(False, "--resize", help="Resize IMAGE to the reference's size when they differ."),
    clip_dir: Optional[str] = typer.Option(None, "--clip-dir", help="Domain CLIP directory (default models/clip)."),
    attributes_dir: Optional[str] = typer.Option(None, "--attributes-dir", help="Attribute checker directory (default models/attributes)."),
    alexnet_weights: Optional[str] = typer.Option(None, "--alexnet-weights", help="Local ImageNet AlexNet checkpoint for LPIPS."),
) -> None:
    """Print every metric that applies; the last stdout line is {metric name: value}.

    With ``domain/attr_acc`` comes ``domain/attr_scored``, what it scored: {"objects": [{"object",
    "attributes"}], "background": bool}; a prompt leaving an attribute unstated, or naming it
    with a word outside the scene domain, is scored on the rest (a note on stderr names the
    words). A model directory left at its default and missing is skipped with a note on stderr;
    one given explicitly must exist.
    """
    import warnings

    from budgetdiff.domain.evaluators import ATTRIBUTE_CHECKER_DIR, DOMAIN_CLIP_DIR, EvaluatorModelError
    from budgetdiff.domain.parse import parse_stated_scene
    from budgetdiff.domain.scenes import PromptParseError

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

    from budgetdiff.metrics import MetricScorer, ScoringConfig

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
    out: dict = {k: round(v, 6) for k, v in values.items()}
    if prompt is not None and "domain/attr_acc" in values:
        try:
            stated = parse_stated_scene(prompt)  # what MetricScorer scored the prompt on
        except PromptParseError as exc:  # NaN: nothing in the prompt the checker can judge
            del out["domain/attr_acc"]
            print(f"note: domain/attr_acc left out: {exc}", file=sys.stderr)
        else:
            out["domain/attr_scored"] = stated.scored()
            for skipped in stated.skipped:
                print(f"note: domain/attr_acc: {skipped}", file=sys.stderr)
    print(json.dumps(out))


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
    from budgetdiff.statistics.drift import MIN_WINDOW, PromptLogError, ReportWriteError, drift_report, read_prompt_log, reference_prompts

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
        raise CliError(str(exc).strip().splitlines()[0]) from None
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
