"""The command-line edge of every stage and tool.

Code below the edge raises exceptions whose message names the problem (``ValueError`` and its
subclasses for bad input or configuration, ``OSError`` for files); only ``main`` turns them into
one line on stderr and exit status 2, so that the same code stays usable from Python and tests.
``BUDGETDIFF_TRACEBACK=1`` lets the exception through with its traceback, for debugging.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable, TypeVar

T = TypeVar("T")
EXIT_USAGE = 2
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


class UsageError(ValueError):
    """The command line itself is wrong (missing or unknown argument)."""


def print_error(message: str) -> int:
    """Print ``error: message`` as one line on stderr (whitespace and line breaks folded);
    returns exit status 2, for a ``main`` that returns its status."""
    line = " ".join(str(message).split())
    print(f"error: {line}", file=sys.stderr)
    return EXIT_USAGE


def fail(message: str) -> None:
    """Print ``error: message`` as one line on stderr and exit with status 2."""
    raise SystemExit(print_error(message))


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are one ``error: ...`` line and exit status 2, without
    the usage block (``--help`` still prints it)."""

    def error(self, message: str):
        fail(message)


def command(main: Callable[..., T] | None = None, *, also: tuple[type[BaseException], ...] = ()):
    """Decorate a ``main`` (``@command`` or ``@command(also=(SomeError,))``): an expected error it
    raises (ValueError, OSError and the ``also`` types) becomes ``error: <message>`` on one line of
    stderr and exit status 2."""
    expected = EXPECTED_ERRORS + tuple(also)

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except expected as exc:
                if os.environ.get("BUDGETDIFF_TRACEBACK"):
                    raise
                fail(str(exc) or type(exc).__name__)

        return wrapper

    return decorate(main) if main is not None else decorate
