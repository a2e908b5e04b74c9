"""Make a registry URI local: ``models:/budgetdiff@champion`` (or ``models:/budgetdiff/3``) -> a
bundle directory ``Generator.load`` reads, and which version it is. The one implementation of
"a registered version as a directory"; two ways to use it:

``resolve(uri)``: for a process that serves the version itself (``serving.sources`` registers it
for the ``models`` scheme). The version is downloaded into ``dst`` or MLflow's temporary
directory and the frozen parts it references by content hash (the text encoder) are linked in
from the cache (``registry.artifacts.resolve_shared_parts``): the overlay lives as long as the
process. ``current_version(uri)`` is the cheap look-up that alias polling compares with.

``fetch(uri, out_dir)``: for a directory that outlives the process (``budgetdiff-registry fetch``,
the GPU worker pods' init container ``infra/docker/entrypoint.sh``):

1. resolve the URI to one version (an alias is looked up; ``models:/NAME/N`` is that version);
2. when ``out_dir`` already holds that version's bundle (the same ``bundle_sha256`` in its
   ``registry_manifest.json``) nothing is fetched;
3. download the version's ``bundle`` artifact and put back the parts it references by hash
   (cache: ``BUDGETDIFF_REGISTRY_CACHE`` or ``cache_dir``);
4. copy the result, symlinks followed, into a temporary sibling of ``out_dir``, check every file
   against the version's manifest (and the manifest against the version's ``bundle_sha256`` tag)
   and rename it into place. A failure leaves ``out_dir`` as it was and no temporary directory.

The tracking URI is ``MLFLOW_TRACKING_URI`` (``mlops.tracking.tracking_uri``). A failure is a
``RegistryError`` with a one-line message: ``model_source: ...`` for the URI, the look-up, the
download and the check, ``model version: ...`` for a referenced part that cannot be had
(``resolve_shared_parts``). A full disk is an ``OSError``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import RegistryError

_URI = re.compile(r"^models:/(?P<name>[A-Za-z0-9_.-]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ResolvedVersion:
    uri: str
    name: str
    version: str
    alias: str | None
    bundle_dir: str
    run_id: str | None
    bundle_sha256: str | None


def parse_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    m = _URI.match(uri.strip())
    if not m:
        raise RegistryError(f"model_source: {uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
    return m.group("name"), m.group("alias"), m.group("version")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def current_version(uri: str, client=None) -> str:
    """The version number ``uri`` points at now (an alias is looked up; cheap: no download)."""
    from .store import connect

    name, alias, version = parse_uri(uri)
    if version:
        return version
    client = client or connect()
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception as exc:  # noqa: BLE001 - unknown alias or model: one line
        raise RegistryError(f"model_source: {uri}: no such alias ({_first_line(exc)})") from None


def _model_version(uri: str, client):
    """(name, alias, the MLflow ModelVersion ``uri`` points at now)."""
    name, alias, _ = parse_uri(uri)
    version = current_version(uri, client)
    try:
        return name, alias, client.get_model_version(name, version)
    except Exception as exc:  # noqa: BLE001 - unknown version or model: one line
        raise RegistryError(f"model_source: {uri}: no such version ({_first_line(exc)})") from None


def _download_bundle(uri: str, name: str, version: str, dst: str | os.PathLike | None) -> tuple[Path, Path]:
    """Download version ``version`` of ``name`` (into ``dst`` or MLflow's temp dir): the download
    and the stored ``bundle`` artifact directory in it (the pyfunc flavour's ``artifacts.bundle.path``)."""
    import mlflow
    import yaml

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                         dst_path=None if dst is None else str(dst)))
    except Exception as exc:  # noqa: BLE001
        raise RegistryError(f"model_source: {uri} (version {version}) could not be downloaded "
                            f"({_first_line(exc)})") from None
    try:
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
        bundle = local / flavor["artifacts"]["bundle"]["path"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        bundle = local / "artifacts" / "bundle"
    if not bundle.is_dir():
        raise RegistryError(f"model_source: {uri} (version {version}) has no bundle artifact "
                            "(not a budgetdiff bundle model)")
    return local, bundle


def resolve(uri: str, dst: str | None = None, client=None, materialize: bool = False) -> ResolvedVersion:
    """Download the version's bundle artifact (into ``dst`` or MLflow's temp dir), link its shared
    parts from the cache, and say which version it is. ``materialize``: copy a linked overlay into
    ``dst/bundle-<version>`` (the overlay is removed when this process exits). For a directory
    meant to stay, verified and replaced atomically, use ``fetch``."""
    from .artifacts import resolve_shared_parts
    from .store import SHA_TAG, connect

    client = client or connect()
    name, alias, mv = _model_version(uri, client)
    version = str(mv.version)
    local, bundle = _download_bundle(uri, name, version, dst)
    bundle_dir = resolve_shared_parts(bundle)
    if materialize and Path(bundle_dir) != bundle.resolve():
        out = Path(dst or local) / f"bundle-{version}"
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(bundle_dir, tmp, symlinks=False)
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
        bundle_dir = out
    return ResolvedVersion(uri=uri, name=name, version=version, alias=alias, bundle_dir=str(bundle_dir),
                           run_id=mv.run_id, bundle_sha256=(mv.tags or {}).get(SHA_TAG))


# ----------------------------------------------------------------------------------------------
# fetch: a verified bundle directory that stays
# ----------------------------------------------------------------------------------------------
def _manifest(bundle_dir: Path) -> dict | None:
    from .artifacts import MANIFEST

    try:
        manifest = json.loads((bundle_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _verify(uri: str, bundle_dir: Path, manifest: dict) -> None:
    """Every file the manifest lists has its sha256; every referenced part is a real directory."""
    from budgetdiff.io.fingerprint import file_sha256

    for rel, sha in sorted((manifest.get("files") or {}).items()):
        path = bundle_dir / rel
        if not path.is_file():
            raise RegistryError(f"model_source: {uri}: {rel} is missing from the fetched bundle")
        if file_sha256(path) != sha:
            raise RegistryError(f"model_source: {uri}: {rel} does not match its sha256 in the version's manifest")
    for rel in manifest.get("shared") or {}:
        if not (bundle_dir / rel).is_dir() or (bundle_dir / rel).is_symlink():
            raise RegistryError(f"model_source: {uri}: the referenced part {rel} was not put in place")


def fetch(uri: str, out_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
          client=None) -> dict:
    """Write the version ``uri`` names to ``out_dir`` (module docstring). Returns ``uri``, ``name``,
    ``alias``, ``version``, ``bundle_sha256``, ``bundle_dir`` (``out_dir``, absolute) and
    ``fetched`` (False when ``out_dir`` already held that version)."""
    from .artifacts import resolve_shared_parts
    from .store import SHA_TAG, connect

    out = Path(out_dir).absolute()
    client = client or connect()
    name, alias, mv = _model_version(uri, client)
    version = str(mv.version)
    sha = (mv.tags or {}).get(SHA_TAG)
    result = {"uri": uri, "name": name, "alias": alias, "version": version, "bundle_sha256": sha,
              "bundle_dir": str(out), "fetched": False}
    current = _manifest(out)
    if sha and current and current.get("bundle_sha256") == sha:
        return result

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-fetch-", dir=out.parent))
    overlay = None
    try:
        _, bundle = _download_bundle(uri, name, version, work / "download")
        overlay = resolve_shared_parts(bundle, cache_dir)
        staged = work / "bundle"
        shutil.copytree(overlay, staged, symlinks=False)
        manifest = _manifest(staged) or {}
        if sha and manifest.get("bundle_sha256") != sha:
            raise RegistryError(f"model_source: {uri}: version {version}'s manifest has bundle_sha256 "
                                f"{str(manifest.get('bundle_sha256'))[:16]}, its tag says {sha[:16]}")
        _verify(uri, staged, manifest)
        if out.exists() or out.is_symlink():
            os.replace(out, work / "previous")  # a directory cannot be renamed over a non-empty one
        os.replace(staged, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if overlay is not None:
            shutil.rmtree(overlay, ignore_errors=True)  # a symlink overlay: the links go, their targets stay
    result.update(fetched=True, bundle_sha256=manifest.get("bundle_sha256", sha))
    return result
