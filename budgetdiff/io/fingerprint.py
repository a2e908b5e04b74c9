"""Fingerprints: one hash per idea, so that every stage keys its caches and records the same way.

- ``content_sha256(obj)``: the SHA-256 of an object's canonical JSON (sorted keys), for cache keys
  and the identity of policies and bundles in records.
- ``file_sha256(path)``: the SHA-256 of one file's bytes.
- ``directory_fingerprint(path)``: every file under a directory (names and bytes), for keys
  that must change with anything in it (a render's model, a budget predictor's folder).
- ``unet_fingerprint(model_dir)``: the files of ``model_dir/unet``, the weights that make one
  model's images differ from another's. It is what a budget predictor records about the model
  it was trained for (``models/budget/config.json``), what the registry tags a version with, and
  what benchmark caches and distillation checkpoints are keyed by.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

UNET_FINGERPRINT_CHARS = 16


class FingerprintError(ValueError):
    """There is nothing to fingerprint (no such directory, or no files in it)."""


def _update_with_file(digest, path: Path, block: int = 1 << 22) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)


def content_sha256(obj: Any, length: int | None = 16) -> str:
    """SHA-256 (first ``length`` hex digits; all 64 when None) of ``obj`` as canonical JSON:
    ``json.dumps(obj, sort_keys=True)``, with ``str()`` for values JSON cannot hold."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    return digest if length is None else digest[:length]


def file_sha256(path: str | os.PathLike, length: int | None = None) -> str:
    """SHA-256 (first ``length`` hex digits; all 64 when None) of the bytes of the file ``path``."""
    digest = hashlib.sha256()
    _update_with_file(digest, Path(path))
    return digest.hexdigest() if length is None else digest.hexdigest()[:length]


def directory_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 over the relative paths and contents of every file under ``path`` (sorted), so
    a directory's fingerprint changes exactly when one of its files does."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        _update_with_file(digest, file)
        digest.update(b"\0")
    return digest.hexdigest()


def unet_fingerprint(model_dir: str | os.PathLike) -> str:
    """SHA-256 (first 16 hex digits) over the names and bytes of the files in
    ``model_dir/unet``. Reads every byte (about 30 ms for the embedded model's 13 MB UNet,
    seconds for a 3.4 GB SD UNet). Raises FingerprintError when there are no such files."""
    unet = Path(model_dir) / "unet"
    files = sorted(p for p in unet.glob("*") if p.is_file()) if unet.is_dir() else []
    if not files:
        raise FingerprintError(f"model: {str(model_dir)!r} has no unet/ files to fingerprint")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        _update_with_file(digest, path)
    return digest.hexdigest()[:UNET_FINGERPRINT_CHARS]
