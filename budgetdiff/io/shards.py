"""Shards: a long job's output split into files that are each written atomically and verified.

A shard is two files in one directory:

- ``NAME.npz``: numeric arrays (``numpy.savez``, loaded with ``allow_pickle=False``), and
- ``NAME.json``: its manifest, ``{"name", "sha256", "bytes", "rows", "key", "meta"}``.

Both are written atomically (temporary file, then rename), the data first and the manifest
last, so a shard whose manifest exists is complete: a job killed at any point leaves each shard
either whole or unfinished, never half-written. ``key`` identifies the work the shard holds
(a hash of everything its content depends on): a rerun reuses a shard only when its key matches,
so changed parameters never mix old and new results. Every read checks the data's SHA-256
against the manifest.

    >>> store = ShardStore("data/renders")
    >>> store.write("s020-p00003", {"images": images, "prompt_id": ids}, key=key, meta={"steps": 20})
    >>> store.status("s020-p00003", key)      # "done" | "missing" | "stale" | "corrupt"
    >>> arrays, manifest = store.read("s020-p00003")   # raises ShardChecksumError when corrupt
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from budgetdiff.io import atomic_write_bytes, atomic_write_json

DATA_SUFFIX = ".npz"
MANIFEST_SUFFIX = ".json"


class ShardError(RuntimeError):
    """A shard is missing or unreadable."""


class ShardChecksumError(ShardError):
    """A shard's data does not match the checksum recorded when it was written."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def work_key(spec: Any) -> str:
    """A stable hash of a JSON-serialisable description of a shard's work."""
    return sha256_bytes(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode())[:32]


class ShardStore:
    """The shards of one job in ``directory``.

    Args:
        directory: where the shard files live (created on the first write).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def data_path(self, name: str) -> Path:
        return self.directory / f"{name}{DATA_SUFFIX}"

    def manifest_path(self, name: str) -> Path:
        return self.directory / f"{name}{MANIFEST_SUFFIX}"

    def write(self, name: str, arrays: dict[str, np.ndarray], key: str, meta: dict | None = None) -> dict:
        """Write shard ``name`` (data, then manifest, each atomically); returns the manifest.

        Args:
            name: file stem, e.g. ``"s020-p00003"``.
            arrays: numeric arrays with one row per item along the first axis (same length).
            key: the work key (see ``work_key``); a later ``status`` compares against it.
            meta: JSON-serialisable facts about the shard (step count, scheduler, ...).
        """
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"shard {name}: arrays of different lengths {lengths}")
        for k, v in arrays.items():
            if np.asarray(v).dtype == object:
                raise ValueError(f"shard {name}: array {k!r} has dtype object (only numeric arrays are stored)")
        buffer = io.BytesIO()
        np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
        data = buffer.getvalue()
        manifest = {"name": name, "sha256": sha256_bytes(data), "bytes": len(data),
                    "rows": next(iter(lengths.values()), 0), "key": key, "meta": meta or {}}
        atomic_write_bytes(self.data_path(name), data)
        atomic_write_json(self.manifest_path(name), manifest)
        return manifest

    def manifest(self, name: str) -> dict | None:
        """The shard's manifest, or None when it has none (never finished) or it is unreadable."""
        try:
            return json.loads(self.manifest_path(name).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _checked_bytes(self, name: str, manifest: dict) -> bytes:
        path = self.data_path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ShardError(f"shard {path}: data file missing (its manifest exists)") from None
        actual = sha256_bytes(data)
        if actual != manifest.get("sha256"):
            raise ShardChecksumError(
                f"shard {path}: checksum mismatch (manifest sha256 {str(manifest.get('sha256'))[:16]}..., "
                f"file sha256 {actual[:16]}..., {len(data)} bytes): the file is corrupt or was changed "
                f"after it was written; rerun the stage that writes it to redo this shard")
        return data

    def status(self, name: str, key: str) -> str:
        """``"done"`` (complete, same key, checksum verified), ``"missing"`` (never finished),
        ``"stale"`` (done for other work: another key) or ``"corrupt"`` (checksum mismatch or
        data file missing)."""
        manifest = self.manifest(name)
        if manifest is None:
            return "missing"
        if manifest.get("key") != key:
            return "stale"
        try:
            self._checked_bytes(name, manifest)
        except ShardError:
            return "corrupt"
        return "done"

    def verify(self, name: str, key: str | None = None) -> dict:
        """The manifest of shard ``name`` once its checksum (and ``key``, when given) check out.

        Raises:
            ShardError: no manifest (the shard never finished), a missing data file, or another key.
            ShardChecksumError: the data does not match its recorded checksum.
        """
        return self._verified(name, key)[1]

    def _verified(self, name: str, key: str | None) -> tuple[bytes, dict]:
        manifest = self.manifest(name)
        if manifest is None:
            raise ShardError(f"shard {self.data_path(name)}: not finished "
                             f"(no manifest {self.manifest_path(name).name})")
        if key is not None and manifest.get("key") != key:
            raise ShardError(f"shard {self.data_path(name)}: holds other work "
                             f"(key {manifest.get('key')}, expected {key})")
        return self._checked_bytes(name, manifest), manifest

    def read(self, name: str, key: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, manifest) of shard ``name``, its checksum verified (errors as ``verify``).

        Args:
            name: the shard's file stem.
            key: when given, the work key the shard must hold.
        """
        data, manifest = self._verified(name, key)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return arrays, manifest

    def names(self) -> list[str]:
        """Stems of every finished shard (data file and manifest both present), sorted."""
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob(f"*{MANIFEST_SUFFIX}")
                      if p.with_suffix(DATA_SUFFIX).is_file())

    def remove(self, name: str) -> None:
        """Delete shard ``name`` (manifest first, so it is never 'done' without its data)."""
        self.manifest_path(name).unlink(missing_ok=True)
        self.data_path(name).unlink(missing_ok=True)

    def prune(self, keep: set[str], extra_files: set[str] = frozenset()) -> list[str]:
        """Delete every shard file and leftover temporary file in the directory that is not a
        shard in ``keep`` or a file named in ``extra_files``; returns the removed file names."""
        removed = []
        if not self.directory.is_dir():
            return removed
        for path in sorted(self.directory.iterdir()):
            if not path.is_file() or path.name in extra_files:
                continue
            stem, suffix = path.name.rsplit(".", 1)[0], path.suffix
            if suffix in (DATA_SUFFIX, MANIFEST_SUFFIX) and stem in keep and not path.name.startswith("."):
                continue
            if suffix in (DATA_SUFFIX, MANIFEST_SUFFIX, ".tmp"):
                path.unlink()
                removed.append(path.name)
        return removed
