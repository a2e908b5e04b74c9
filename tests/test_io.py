"""budgetdiff/io/__init__.py: atomic writes (whole file or none, permissions as a plain write) and PNG bytes."""

from __future__ import annotations

import io
import json
import os
import stat

import numpy as np
import pytest
from PIL import Image

from budgetdiff.io import atomic_write_bytes, atomic_write_json, png_bytes


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_mode_a_plain_write_gives(tmp_path, umask, mask, mode):
    umask(mask)
    atomic_write_json(tmp_path / "a.json", {"b": 1})
    atomic_write_bytes(tmp_path / "sub" / "c.bin", b"xyz")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    for path in (tmp_path / "a.json", tmp_path / "sub" / "c.bin", plain):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_json_is_sorted_indented_and_replaces_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"z": 1})
    atomic_write_json(path, {"b": [1, 2], "a": None})
    assert path.read_text() == json.dumps({"a": None, "b": [1, 2]}, indent=2, sort_keys=True) + "\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "r.bin"
    atomic_write_bytes(path, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["r.bin"]


def test_png_bytes_decode_to_the_same_pixels():
    pixels = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(pixels))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
