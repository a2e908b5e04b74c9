"""What one model version holds: a bundle copied into one directory, and the frozen parts it
references by content hash instead of copying.

``stage_bundle(models/bundle, out)`` writes::

    out/bundle.json            paths rewritten: "base", "student", "budget" (inside out/)
    out/skip_policy.json
    out/base/                  unet/, scheduler/, tokenizer/, model_index.json (no text_encoder/)
    out/student/               the same for the step-distilled student
    out/budget/                the budget predictor
    out/registry_manifest.json every file's sha256, the bundle's content hash, and the
                               referenced parts: {"base/text_encoder": {"sha256", "uri"}, ...}

Only safetensors and configs are copied (``COPY_SUFFIXES``); anything else in a model directory
is left out and listed. The frozen text encoder (87 MB of the embedded model's 100 MB) is stored
once per content hash (``registry.store.store_shared_part``) and put back in place at load time by
``resolve_shared_parts``, from a local cache or the artifact store; when neither has it, loading
fails with one line naming the part, its hash and where it looked.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from budgetdiff.io.fingerprint import content_sha256, file_sha256

from . import RegistryError

MANIFEST = "registry_manifest.json"
MANIFEST_FORMAT = "budgetdiff-registry-manifest/1"
COPY_SUFFIXES = (".safetensors", ".json", ".txt")
SHARED_PARTS = ("text_encoder",)  # frozen: referenced by content hash, not copied per version
PARTS = ("base", "student", "budget")


def directory_sha256(path: str | os.PathLike) -> str:
    """sha256 over the sorted relative paths and bytes of every file under ``path`` (symlinks
    followed): a directory's content hash, the same wherever it is copied to."""
    root = Path(path).resolve()
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(file_sha256(file).encode() + b"\0")
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Where referenced parts are kept once fetched: ``BUDGETDIFF_REGISTRY_CACHE``, default
    ``~/.cache/budgetdiff/registry``."""
    return Path(os.environ.get("BUDGETDIFF_REGISTRY_CACHE", Path.home() / ".cache" / "budgetdiff" / "registry"))


@dataclass
class StagedBundle:
    """A bundle staged for logging (``stage_bundle``)."""

    root: Path
    sha256: str  # content hash of everything the version holds or references
    bundle_json_sha256: str
    shared: dict  # {"base/text_encoder": {"sha256": ..., "source": abs path}}
    sources: dict  # {"base": abs path of the model directory it came from, ...}
    left_out: list = field(default_factory=list)

    @property
    def manifest(self) -> dict:
        return json.loads((self.root / MANIFEST).read_text())

    def set_shared_uri(self, rel: str, uri: str) -> None:
        """Record where the referenced part ``rel`` is stored (the manifest's ``uri``)."""
        manifest = self.manifest
        manifest["shared"][rel]["uri"] = uri
        (self.root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _copy_model_dir(src: Path, dst: Path, rel: str, shared: dict, left_out: list) -> None:
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if entry.is_dir():
            if entry.name in SHARED_PARTS:
                resolved = entry.resolve()
                shared[f"{rel}/{entry.name}"] = {"sha256": directory_sha256(resolved), "source": str(resolved)}
                continue
            _copy_model_dir(entry, target, f"{rel}/{entry.name}", shared, left_out)
        elif entry.suffix in COPY_SUFFIXES:
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(entry, target)  # follows symlinks: the version holds real files
        else:
            left_out.append(f"{rel}/{entry.name}")


def stage_bundle(bundle_dir: str | os.PathLike, out: str | os.PathLike) -> StagedBundle:
    """Copy the bundle at ``bundle_dir`` with its model directories into ``out`` (module
    docstring). Raises RegistryError (one line) when the bundle does not load."""
    from budgetdiff.generation.bundle import BUNDLE_FILE, BundleError, load_bundle, write_bundle

    try:
        bundle = load_bundle(bundle_dir)
    except BundleError as exc:
        raise RegistryError(str(exc)) from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads(json.dumps(bundle.raw))
    sources = {"base": bundle.base, "student": bundle.student.path if bundle.student else None,
               "budget": bundle.budget}
    shared: dict = {}
    left_out: list = []
    for name in PARTS:
        if sources[name] is None:
            continue
        _copy_model_dir(Path(sources[name]), out / name, name, shared, left_out)
        raw[name]["path"] = name
    write_bundle(out, raw, bundle.skip_policy)
    files = {p.relative_to(out).as_posix(): file_sha256(p) for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    content = {"files": files, "shared": {k: v["sha256"] for k, v in shared.items()}}
    sha = content_sha256(content, None)
    manifest = {"format": MANIFEST_FORMAT, "bundle_sha256": sha, "files": files,
                "shared": {k: {"sha256": v["sha256"], "uri": None} for k, v in shared.items()},
                "left_out": left_out}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    bundle_json = json.loads((out / BUNDLE_FILE).read_text())
    return StagedBundle(out, sha, content_sha256(bundle_json), shared,
                        {k: v for k, v in sources.items() if v}, left_out)


def _fetch(uri: str, sha: str, cache: Path) -> None:
    """Download the part at ``uri`` into ``cache`` (atomically), checking its hash."""
    import mlflow

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}-", dir=cache.parent))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        got = directory_sha256(local)
        if got != sha:
            raise RegistryError(f"{uri} has content sha256 {got[:16]}, not the referenced {sha[:16]}")
        try:
            os.replace(local, cache)
        except OSError:
            if not cache.is_dir():  # another process put it there first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_shared_parts(bundle_root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A directory where the staged bundle at ``bundle_root`` loads with ``Generator.load``:
    ``bundle_root`` itself when nothing is referenced, else an overlay of symlinks (the stored
    artifact is never written to: a local artifact store hands out its own directory) with every
    referenced part linked from the cache, fetched from its artifact URI when the cache lacks it.
    Raises RegistryError, one line naming what is missing, when a part cannot be had."""
    root = Path(bundle_root).resolve()
    manifest_file = root / MANIFEST
    if not manifest_file.is_file():
        raise RegistryError(f"model version: {str(root)!r} has no {MANIFEST}; it is not a budgetdiff registry bundle")
    manifest = json.loads(manifest_file.read_text())
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    missing = {rel: ref for rel, ref in sorted(manifest.get("shared", {}).items()) if not (root / rel).exists()}
    if not missing:
        return root
    parts = {}
    for rel, ref in missing.items():
        sha, uri = ref["sha256"], ref.get("uri")
        cache = cache_root / "sha256" / sha
        if not cache.is_dir():
            if not uri:
                raise RegistryError(f"model version: {rel} (sha256 {sha[:16]}) is missing: not in {cache} "
                                    "and the version records no URI for it")
            try:
                _fetch(uri, sha, cache)
            except Exception as exc:  # noqa: BLE001 - any failure to fetch is one line for the user
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise RegistryError(f"model version: {rel} (sha256 {sha[:16]}) is missing: not in {cache} "
                                    f"and {uri} could not be downloaded ({reason})") from None
        parts[rel] = cache.resolve()
    overlay = Path(tempfile.mkdtemp(prefix="budgetdiff-bundle-"))
    atexit.register(shutil.rmtree, overlay, True)  # symlinks only: their targets stay
    _link_tree(root, overlay, parts, "")
    return overlay


def _link_tree(src: Path, dst: Path, parts: dict, rel: str) -> None:
    """Mirror ``src`` in ``dst`` with symlinks, descending only into directories that lead to a
    referenced part, and link each part (``parts``: {relative path: cached directory})."""
    for entry in src.iterdir():
        sub = f"{rel}{entry.name}"
        if entry.is_dir() and any(p.startswith(sub + "/") for p in parts):
            (dst / entry.name).mkdir()
            _link_tree(entry, dst / entry.name, parts, sub + "/")
        else:
            (dst / entry.name).symlink_to(entry)
    for p, target in parts.items():
        if p.rsplit("/", 1)[0] + "/" == rel or ("/" not in p and rel == ""):
            (dst / p.rsplit("/", 1)[-1]).symlink_to(target, target_is_directory=True)
