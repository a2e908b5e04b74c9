"""Offline checks of the rendered manifests (no cluster needed).

- ``schema_errors``: the KubeRay v1.7.0 ``RayService`` CRD schema (``infra/schemas/``, the CRD's
  ``openAPIV3Schema``) with ``jsonschema.Draft7Validator``.
- ``unknown_keys``: that schema has no ``additionalProperties: false``, so a misspelled key
  (``minReplica``) passes it and the API server prunes it silently. This walks the manifest beside
  the schema and reports every key that is not among an object's ``properties``.
- ``ray_start_param_errors``: ``rayStartParams`` is a free string map; KubeRay turns each key into
  a ``ray start --KEY=VALUE`` flag, so each key is checked against the installed ``ray start``.
- ``serve_config_errors``: ``serveConfigV2`` is a plain string: parsed and checked with Ray Serve's
  ``ServeDeploySchema`` and ``serving.config.validate_serve_config``.
- ``unknown_podmonitor_keys`` / ``selector_matches``: the PodMonitor against the subset of the
  Prometheus Operator's ``monitoring.coreos.com/v1`` fields written here, and label selection as
  Kubernetes evaluates it.

Every error is one line that starts with the path of the offending key.
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

SCHEMA_FILE = Path(__file__).resolve().parent / "schemas" / "kuberay-v1.7.0-rayservice-v1.schema.json"
# The CRD schema leaves ObjectMeta open ({"type": "object"}); these are the keys a manifest may set.
OBJECT_META_KEYS = ("name", "namespace", "labels", "annotations", "generateName")


@lru_cache(maxsize=1)
def load_schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def _path(parent: str, key: Any) -> str:
    return f"{parent}.{key}" if parent else str(key)


def _unknown(where: str, key: str, allowed) -> str:
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    return f"{where}: unknown key" + (f" (did you mean {close[0]}?)" if close else "")


def schema_errors(manifest: dict, schema: dict | None = None) -> list[str]:
    """Draft-7 validation errors of ``manifest`` against the RayService CRD schema."""
    from jsonschema import Draft7Validator

    validator = Draft7Validator(schema or load_schema())
    errors = []
    for err in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in err.absolute_path) or "manifest"
        errors.append(f"{where}: {err.message}")
    return errors


def unknown_keys(obj: Any, schema: dict, where: str = "") -> list[str]:
    """Keys of ``obj`` that ``schema`` does not define, recursively (objects with ``properties``
    and no ``additionalProperties``/``x-kubernetes-preserve-unknown-fields`` are closed)."""
    errors: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        open_ = schema.get("x-kubernetes-preserve-unknown-fields") or extra is True
        if props is None and (where == "metadata" or where.endswith(".metadata")):
            props = {k: {} for k in OBJECT_META_KEYS}
        for key, value in obj.items():
            path = _path(where, key)
            if props is not None and key in props:
                errors += unknown_keys(value, props[key], path)
            elif isinstance(extra, dict):
                errors += unknown_keys(value, extra, path)
            elif props is not None and not open_:
                errors.append(_unknown(path, key, props))
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            errors += unknown_keys(item, schema["items"], f"{where}[{i}]")
    return errors


@lru_cache(maxsize=1)
def ray_start_options() -> frozenset[str]:
    """The long options of the installed ``ray start`` (``num-cpus``, ``metrics-export-port``, ...)."""
    from ray.scripts.scripts import start

    return frozenset(o[2:] for p in start.params for o in p.opts if o.startswith("--"))


def ray_start_param_errors(manifest: dict) -> list[str]:
    """``rayStartParams`` keys that ``ray start`` does not know (KubeRay passes ``--KEY=VALUE``)."""
    cluster = manifest.get("spec", {}).get("rayClusterConfig", {})
    groups = [("spec.rayClusterConfig.headGroupSpec", cluster.get("headGroupSpec") or {})]
    groups += [(f"spec.rayClusterConfig.workerGroupSpecs[{i}]", g)
               for i, g in enumerate(cluster.get("workerGroupSpecs") or [])]
    known = ray_start_options()
    errors = []
    for where, group in groups:
        for key in group.get("rayStartParams") or {}:
            if key not in known:
                errors.append(_unknown(f"{where}.rayStartParams.{key}", key, known).replace(
                    "unknown key", "not a `ray start` option"))
    return errors


def serve_config_of(manifest: dict) -> dict:
    """``spec.serveConfigV2`` parsed (ValueError when it is missing or not a YAML mapping)."""
    text = manifest.get("spec", {}).get("serveConfigV2")
    if not isinstance(text, str):
        raise ValueError("spec.serveConfigV2: missing (a YAML string)")
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"spec.serveConfigV2: not valid YAML ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError("spec.serveConfigV2: must be a YAML mapping")
    return cfg


def serve_config_errors(manifest: dict) -> list[str]:
    """``serveConfigV2`` against Ray Serve's ``ServeDeploySchema`` and our nested-key validation."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from serving.config import validate_serve_config

    try:
        cfg = serve_config_of(manifest)
        ServeDeploySchema(**cfg)
        validate_serve_config(cfg)
    except ValidationError as exc:
        err = exc.errors()[0]
        return [f"spec.serveConfigV2.{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg')}"]
    except ValueError as exc:
        msg = str(exc)
        return [msg if msg.startswith("spec.serveConfigV2") else f"spec.serveConfigV2: {msg}"]
    return []


def rayservice_errors(manifest: dict) -> list[str]:
    """Everything above, for a RayService manifest."""
    return (schema_errors(manifest) + unknown_keys(manifest, load_schema()) + ray_start_param_errors(manifest)
            + serve_config_errors(manifest))


# ----------------------------------------------------------------------------------------------
# PodMonitor (monitoring.coreos.com/v1): the fields written here and their well-known siblings
# ----------------------------------------------------------------------------------------------
_STR = {"type": "string"}
_STRMAP = {"type": "object", "additionalProperties": _STR}
_RELABEL = {"type": "object", "properties": {k: {} for k in (
    "sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action")}}
_LABEL_SELECTOR = {"type": "object", "properties": {
    "matchLabels": _STRMAP,
    "matchExpressions": {"type": "array", "items": {"type": "object", "properties": {
        "key": _STR, "operator": _STR, "values": {"type": "array", "items": _STR}}}}}}
PODMONITOR_SCHEMA = {"type": "object", "properties": {
    "apiVersion": _STR, "kind": _STR, "metadata": {"type": "object"},
    "spec": {"type": "object", "properties": {
        "jobLabel": _STR, "podTargetLabels": {"type": "array", "items": _STR},
        "sampleLimit": {}, "targetLimit": {}, "attachMetadata": {},
        "namespaceSelector": {"type": "object", "properties": {"any": {}, "matchNames": {}}},
        "selector": _LABEL_SELECTOR,
        "podMetricsEndpoints": {"type": "array", "items": {"type": "object", "properties": {
            k: {} for k in ("port", "portNumber", "targetPort", "path", "scheme", "params", "interval",
                            "scrapeTimeout", "honorLabels", "honorTimestamps", "enableHttp2",
                            "filterRunning", "followRedirects", "tlsConfig", "basicAuth", "authorization",
                            "bearerTokenSecret", "proxyUrl")} | {
            "relabelings": {"type": "array", "items": _RELABEL},
            "metricRelabelings": {"type": "array", "items": _RELABEL}}}}}}}}


def unknown_podmonitor_keys(manifest: dict) -> list[str]:
    errors = unknown_keys(manifest, PODMONITOR_SCHEMA)
    if manifest.get("apiVersion") != "monitoring.coreos.com/v1" or manifest.get("kind") != "PodMonitor":
        errors.append(f"apiVersion/kind: must be monitoring.coreos.com/v1 PodMonitor, got "
                      f"{manifest.get('apiVersion')} {manifest.get('kind')}")
    endpoints = manifest.get("spec", {}).get("podMetricsEndpoints")
    if not endpoints:
        errors.append("spec.podMetricsEndpoints: at least one endpoint is needed")
    return errors


def selector_matches(selector: dict, labels: dict) -> bool:
    """A Kubernetes LabelSelector (``matchLabels`` and ``matchExpressions``) against pod labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"matchExpressions: unknown operator {op!r}")
    return True
