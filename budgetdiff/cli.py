"""The ``budgetdiff`` command.

    budgetdiff generate "PROMPT" [--model DIR] [--steps N] [--scheduler ddim|dpmpp|euler]
        [--guidance G] [--seed S] [--out FILE.png]

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
    steps: str = typer.Option("50", "--steps", help="Denoising steps, 1..1000."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="ddim, dpmpp or euler (default: the model's)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale (default: the model's)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    out: Path = typer.Option(Path("out.png"), "--out", help="Where to write the PNG."),
    upscale: int = typer.Option(1, "--upscale", help="Also enlarge the PNG by this integer factor (nearest), for viewing."),
) -> None:
    """Generate one image; the last stdout line is a JSON record."""
    from .generation import ModelDirectoryError, check_generation_args, generate as run, load_pipeline

    if steps == "auto":
        raise CliError("--steps: 'auto' needs a trained budget predictor, which this version does not have yet")
    try:
        n_steps = int(steps)
    except ValueError:
        raise CliError(f"--steps: must be an integer, got {steps!r}") from None
    if guidance is not None and not math.isfinite(guidance):
        raise CliError(f"--guidance: must be finite, got {guidance}")
    if upscale < 1:
        raise CliError(f"--upscale: must be >= 1, got {upscale}")
    try:
        check_generation_args([prompt], n_steps, guidance, scheduler)
    except ValueError as exc:
        raise CliError(f"--{exc}") from None
    _check_output_path(out)
    try:
        pipe = load_pipeline(model)
    except ModelDirectoryError as exc:
        raise CliError(f"--{exc}") from None
    images, records = run(pipe, [prompt], steps=n_steps, guidance=guidance, scheduler=scheduler, seed=seed,
                          progress=sys.stderr.isatty())
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
    print(json.dumps(record))


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
