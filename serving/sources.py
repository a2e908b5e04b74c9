"""Where the model deployment gets its bundle: a local directory or a registry URI.

``resolve_model_source(source)`` turns a ``model_source`` string into a local bundle directory and
what replies should say about it. ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` go through
the MLflow registry (``registry.resolve``; ``MLFLOW_TRACKING_URI``); another scheme is served by a
resolver registered with ``register_source_resolver(scheme, fn)``; ``fn(source)`` returns
``ResolvedSource``. Without one, such a source is a one-line ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mlops.repo import REPO_ROOT


@dataclass(frozen=True)
class ResolvedSource:
    """A model source made local.

    Args:
        bundle_dir: the local bundle directory ``Generator.load`` reads.
        source: the string it came from (what replies name).
        registry_version: the registry's version of it (None for a plain directory).
        info: anything else replies should carry (registry name, alias, run id, ...).
    """

    bundle_dir: str
    source: str
    registry_version: str | None = None
    info: dict = field(default_factory=dict)


_RESOLVERS: dict[str, Callable[[str], ResolvedSource]] = {}


def register_source_resolver(scheme: str, resolver: Callable[[str], ResolvedSource]) -> None:
    """Serve ``scheme:/...`` model sources with ``resolver`` (e.g. the model registry's)."""
    _RESOLVERS[scheme] = resolver


def resolve_local_path(path: str) -> str:
    """``path`` absolute, relative ones taken against the repository root; URIs unchanged."""
    if _scheme(path):
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (REPO_ROOT / p).resolve())


def _scheme(source: str) -> str | None:
    head, sep, _ = source.partition(":/")
    return head if sep and head.isidentifier() and len(head) > 1 else None


def _registry_resolver(source: str) -> ResolvedSource:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` through the MLflow registry (registry/)."""
    from registry import RegistryError
    from registry.resolve import resolve

    try:
        v = resolve(source)
    except RegistryError as exc:
        raise ValueError(str(exc)) from None
    return ResolvedSource(v.bundle_dir, source, v.version,
                          {"name": v.name, "alias": v.alias, "version": v.version, "run_id": v.run_id,
                           "bundle_sha256": v.bundle_sha256})


def registry_version(source: str) -> str | None:
    """The version a registry source points at now (None for a local directory): what polling
    compares with the loaded one."""
    if _scheme(source) != "models":
        return None
    from registry import RegistryError
    from registry.resolve import current_version

    try:
        return current_version(source)
    except RegistryError as exc:
        raise ValueError(str(exc)) from None


_RESOLVERS["models"] = _registry_resolver


def resolve_model_source(source: str) -> ResolvedSource:
    """The local bundle directory for ``source`` (ValueError starting "model_source:" otherwise)."""
    scheme = _scheme(source)
    if scheme is None:
        path = resolve_local_path(source)
        if not Path(path).is_dir():
            raise ValueError(f"model_source: bundle directory {path!r} does not exist")
        return ResolvedSource(path, source)
    if scheme not in _RESOLVERS:
        raise ValueError(f"model_source: no resolver for {scheme}:/ sources (registered: "
                         f"{', '.join(_RESOLVERS) or 'none'}); give a local bundle directory")
    return _RESOLVERS[scheme](source)
