"""Read a user's prompt file: one prompt per line, or a CSV with a ``prompt`` column.

Bad lines never stop the read: each is reported with its line number and reason and skipped.

| reason | example |
|---|---|
| empty | a blank or whitespace-only line (or CSV ``prompt`` field) |
| over-long | more than ``max_chars`` characters after stripping |
| not UTF-8 | bytes that do not decode as UTF-8 |
| control characters | NUL, escape and other C0/C1 controls (tabs, CSV field line breaks: spaces) |
| duplicate | the same prompt as an earlier line, ignoring case and spacing |

    >>> result = read_prompt_file("captions.csv", max_chars=500)
    >>> result.prompts[0]          # PromptLine(line=2, text="a dog on a beach")
    >>> for bad in result.rejected:
    ...     print(bad)              # "captions.csv:7: not UTF-8 (invalid byte 0xff at column 12)"

A file that cannot be used at all (missing, a CSV with no ``prompt`` column) raises
``PromptFileError`` with a one-line message.
"""

from __future__ import annotations

import csv
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

DEFAULT_MAX_CHARS = 500
PROMPT_COLUMN = "prompt"
CSV_SUFFIXES = (".csv",)
_LINE_SPACE = re.compile(r"[\t\r\n]+")


class PromptFileError(ValueError):
    """The prompt file as a whole cannot be read (missing, no ``prompt`` column, no prompt)."""


@dataclass(frozen=True)
class PromptLine:
    """A valid prompt and the (1-based) line of the file where it starts."""

    line: int
    text: str


@dataclass(frozen=True)
class RejectedLine:
    """A skipped line: its (1-based) number and why it was skipped."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class PromptFileResult:
    """The valid prompts in file order and the rejected lines."""

    prompts: list[PromptLine] = field(default_factory=list)
    rejected: list[RejectedLine] = field(default_factory=list)


def _decoded_lines(raw: bytes, path: str, rejected: list[RejectedLine]) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line that decodes as UTF-8; the others go to ``rejected``."""
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is not part of the first prompt
        raw = raw[3:]
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline ends the last line; it does not start an empty one
    for number, data in enumerate(lines, start=1):
        data = data.removesuffix(b"\r")
        try:
            yield number, data.decode("utf-8")
        except UnicodeDecodeError as exc:
            rejected.append(RejectedLine(path, number, f"not UTF-8 (invalid byte 0x{data[exc.start]:02x} at "
                                                       f"column {exc.start + 1})"))


def _problem(text: str, max_chars: int) -> str | None:
    """Why ``text`` (already stripped) is not a usable prompt, or None."""
    if not text:
        return "empty"
    if len(text) > max_chars:
        return f"over-long ({len(text)} characters > {max_chars})"
    bad = sorted({c for c in text if unicodedata.category(c) == "Cc"})
    if bad:
        return "control characters (" + ", ".join(f"U+{ord(c):04X}" for c in bad) + ")"
    return None


def _csv_rows(lines: Iterator[tuple[int, str]], path: str) -> Iterator[tuple[int, str | None]]:
    """(first line, prompt field or None when the row has no such field) of each CSV row."""
    first: list[int | None] = [None]
    last = [0]

    def texts():
        for number, text in lines:
            if first[0] is None:
                first[0] = number
            last[0] = number
            yield text + "\n"  # csv keeps line breaks inside quoted fields

    reader = csv.reader(texts())
    try:
        header = next(reader)
    except StopIteration:
        raise PromptFileError(f"prompt_file: {path} is empty") from None
    except csv.Error as exc:
        raise PromptFileError(f"prompt_file: {path}:{last[0]}: malformed CSV header ({exc})") from None
    names = [h.strip().lower() for h in header]
    if PROMPT_COLUMN not in names:
        raise PromptFileError(f"prompt_file: {path} has no {PROMPT_COLUMN!r} column "
                              f"(header: {', '.join(h.strip() for h in header) or 'empty'})")
    column = names.index(PROMPT_COLUMN)
    while True:
        first[0] = None
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise PromptFileError(f"prompt_file: {path}:{last[0]}: malformed CSV ({exc})") from None
        line = first[0] if first[0] is not None else last[0]
        if not row:
            yield line, ""
        else:
            yield line, row[column] if column < len(row) else None


def read_prompt_file(path: str | os.PathLike, max_chars: int = DEFAULT_MAX_CHARS) -> PromptFileResult:
    """The prompts of a text file (one per line) or a CSV file (a ``prompt`` column; any others
    are ignored), with every bad line reported and skipped.

    Args:
        path: the file; ``.csv`` files are read as CSV (header row first), anything else as
            one prompt per line.
        max_chars: longest prompt accepted, in characters (default 500). Prompts longer than the
            text encoder's token limit but within ``max_chars`` are kept (the pipeline truncates
            them and says so in its record).

    Raises:
        PromptFileError: the file is missing or unreadable, or a CSV has no ``prompt`` column.
    """
    p = Path(path)
    name = str(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise PromptFileError(f"prompt_file: {name} does not exist") from None
    except OSError as exc:
        raise PromptFileError(f"prompt_file: cannot read {name} ({exc.strerror or exc})") from None
    result = PromptFileResult()
    lines = _decoded_lines(raw, name, result.rejected)
    rows = _csv_rows(lines, name) if p.suffix.lower() in CSV_SUFFIXES else lines
    seen: dict[str, int] = {}
    for number, text in rows:
        if text is None:
            result.rejected.append(RejectedLine(name, number, f"no {PROMPT_COLUMN!r} field in this row"))
            continue
        text = _LINE_SPACE.sub(" ", text).strip()  # tabs, and line breaks inside a quoted CSV field
        problem = _problem(text, max_chars)
        if problem is None:
            key = " ".join(text.split()).lower()
            if key in seen:
                problem = f"duplicate of line {seen[key]}"
            else:
                seen[key] = number
        if problem is not None:
            result.rejected.append(RejectedLine(name, number, problem))
            continue
        result.prompts.append(PromptLine(number, " ".join(text.split())))
    result.rejected.sort(key=lambda r: r.line)
    return result
