"""The ``budgetdiff`` command.

    budgetdiff generate "PROMPT" [--model DIR] [--steps N|auto] [--quality-target Q]
        [--budget-model DIR] [--scheduler ddim|dpmpp|euler] [--guidance G] [--seed S]
        [--adaptive] [--threshold D] [--max-skip C] [--out FILE.png]
    budgetdiff score IMAGE [--ref REF.png] [--prompt TEXT] [--resize]

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

DEFAULT_MODEL = os.environ.get("BUDGETDIFF_MODEL", "models/base")
DEFAULT_BUDGET_MODEL = os.environ.get("BUDGETDIFF_BUDGET_MODEL", "models/budget")

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


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The text prompt."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Diffusers model directory: the embedded model, or a local SD 1.5 / SDXL."),
    steps: str = typer.Option("50", "--steps", help="Denoising steps, 1..1000, or 'auto': chosen for this prompt by the budget predictor before generating."),
    quality_target: Optional[float] = typer.Option(None, "--quality-target", help="With --steps auto: the fewest steps whose predicted quality reaches this fraction (0, 1] of the reference on every level (default: the plateau rule)."),
    budget_model: str = typer.Option(DEFAULT_BUDGET_MODEL, "--budget-model", help="With --steps auto: the budget predictor directory (train_budget)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="ddim, dpmpp or euler (default: the model's)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale (default: the model's)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    out: Path = typer.Option(Path("out.png"), "--out", help="Where to write the PNG."),
    upscale: int = typer.Option(1, "--upscale", help="Also enlarge the PNG by this integer factor (nearest), for viewing."),
    adaptive: bool = typer.Option(False, "--adaptive", help="Skip redundant noise predictions (AdaptiveDiffusion)."),
    threshold: float = typer.Option(0.01, "--threshold", help="Adaptive skip threshold δ (>= 0; 0 skips nothing)."),
    max_skip: int = typer.Option(4, "--max-skip", help="Adaptive: most consecutive skipped predictions, C_max."),
    reuse: str = typer.Option("epsilon", "--reuse", help="Adaptive: what a skipped step reuses: epsilon (the noise prediction, any model type), output (the raw network output, as the official code) or sample (the predicted clean image)."),
) -> None:
    """Generate one image; the last stdout line is a JSON record."""
    from .generation import ModelDirectoryError, check_generation_args, generate as run, load_pipeline

    auto = steps.strip().lower() == "auto"
    if auto:
        n_steps = None
    else:
        try:
            n_steps = int(steps)
        except ValueError:
            raise CliError(f"--steps: must be an integer or 'auto', got {steps!r}") from None
    if quality_target is not None:
        if not auto:
            raise CliError("--quality-target: only applies with --steps auto")
        if not (math.isfinite(quality_target) and 0 < quality_target <= 1):
            raise CliError(f"--quality-target: must be in (0, 1], got {quality_target}")
    if guidance is not None and not math.isfinite(guidance):
        raise CliError(f"--guidance: must be finite, got {guidance}")
    if upscale < 1:
        raise CliError(f"--upscale: must be >= 1, got {upscale}")
    try:
        check_generation_args([prompt], 1 if auto else n_steps, guidance, scheduler)
    except ValueError as exc:
        raise CliError(f"--{exc}") from None
    skip_config = None
    if adaptive:
        from .adaptive import AdaptiveSkipConfig

        try:
            skip_config = AdaptiveSkipConfig(threshold=threshold, max_skip=max_skip, reuse=reuse)
        except ValueError as exc:
            raise CliError(f"--{str(exc).replace('max_skip', 'max-skip')}") from None
    _check_output_path(out)
    predictor = _load_budget_model(budget_model, model) if auto else None
    try:
        pipe = load_pipeline(model)
    except ModelDirectoryError as exc:
        raise CliError(f"--{exc}") from None
    budget = None
    if predictor is not None:
        n_steps, budget = _choose_budget(predictor, pipe, prompt, model, budget_model, quality_target,
                                         scheduler, guidance)
    images, records = run(pipe, [prompt], steps=n_steps, guidance=guidance, scheduler=scheduler, seed=seed,
                          progress=sys.stderr.isatty(), adaptive=skip_config)
    image = images[0]
    if upscale > 1:
        from PIL import Image

        image = image.resize((image.width * upscale, image.height * upscale), Image.Resampling.NEAREST)
    from .io import atomic_write_bytes
    import io as _io

    buffer = _io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(out, buffer.getvalue())
    record = {**records[0], "model": str(model), "out": str(out)}
    if budget is not None:
        record.update(steps_auto=True, budget=budget)
    print(json.dumps(record))


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


def _choose_budget(predictor, pipe, prompt: str, model: str, budget_model: str, quality_target: float | None,
                   scheduler: str | None, guidance: float | None) -> tuple[int, dict]:
    """Predict the prompt's metric curves and choose its step count (BudgetFusion); returns the
    steps and the record's ``budget`` entry (rule, choice, predicted curves, prediction time)."""
    import time

    from .budget import BudgetModelError, choose_steps, text_encoder_of

    try:
        encoder, tokenizer, _ = text_encoder_of(pipe)
        start = time.perf_counter()
        curves = predictor.predict([prompt], encoder, tokenizer)[0]
        choice = choose_steps(curves, predictor.default_rule(quality_target))
        prediction_ms = (time.perf_counter() - start) * 1000
    except BudgetModelError as exc:
        raise CliError(f"--budget-model: {exc}") from None
    notes = [choice.note] if choice.note else []
    if curves.prompt_truncated:
        notes.append(f"prompt longer than {predictor.config['max_text_length']} tokens: "
                     "the predictor read the truncated prompt")
    # The curves were learned at the dataset's scheduler and guidance; others may need other budgets.
    rendered = predictor.config.get("rendered_with") or {}
    if scheduler is not None and "scheduler" in rendered and scheduler.lower() != rendered["scheduler"]:
        notes.append(f"the budget model learned curves with scheduler {rendered['scheduler']}, not {scheduler}")
    if guidance is not None and "guidance" in rendered and float(guidance) != float(rendered["guidance"]):
        notes.append(f"the budget model learned curves at guidance {rendered['guidance']}, not {guidance}")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    budget = {"budget_model": str(budget_model), "chosen_steps": choice.steps, "rule": choice.rule,
              "reached": choice.reached, "per_level": choice.per_level, "prediction_ms": round(prediction_ms, 3),
              "prompt_truncated": curves.prompt_truncated, "predicted_curves": curves.to_record(),
              "notes": notes}
    return choice.steps, budget


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
