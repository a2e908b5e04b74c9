"""Registry operations on MLflow: connect, register a bundle, aliases and their history, list.

Tracking URI: ``MLFLOW_TRACKING_URI`` (an ``http://`` server or ``sqlite:///ABS/mlflow.db``),
default ``sqlite:///<repo>/mlflow.db``. With a sqlite URI, the registry's experiment keeps its
artifacts in ``mlartifacts/`` beside the database file (an absolute location, so any working
directory works); with a server, the server's artifact root.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlops.repo import REPO_ROOT
from mlops.tracking import git_commit, tracking_uri

from . import CHALLENGER, CHAMPION, EXPERIMENT, MODEL_NAME, RegistryError

if TYPE_CHECKING:
    from .artifacts import StagedBundle

HISTORY_TAG = "champion_history"  # registered-model tag: JSON list of {version, at, by}
SHA_TAG = "bundle_sha256"
PIP_PACKAGES = ("torch", "diffusers", "transformers", "safetensors", "open_clip_torch", "lpips", "mlflow", "pandas")


def connect():
    """An MlflowClient on the tracking URI (also set as the fluent API's tracking and registry
    URI). A sqlite database is created here, before any parallel use (they race on migrations)."""
    import logging

    import mlflow
    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def artifact_location(uri: str) -> str | None:
    """``file://<db dir>/mlartifacts`` for a sqlite URI; None (the server's default) otherwise."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None


def experiment_id(client) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=artifact_location(tracking_uri()))
    except MlflowException:  # created by a concurrent process
        return client.get_experiment_by_name(EXPERIMENT).experiment_id




# ----------------------------------------------------------------------------------------------
# Lineage
# ----------------------------------------------------------------------------------------------
_TAG_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


def tag_key(key: str) -> str:
    """A key MLflow accepts (letters, digits, ``_-. /``; anything else becomes ``_``)."""
    return _TAG_KEY.sub("_", key)[:250]


def flatten(obj: Any, prefix: str) -> dict[str, str]:
    """Scalar leaves of a report as {"prefix.a.b": "value"}; lists are left out."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}"))
    elif isinstance(obj, bool) or obj is None:
        out[tag_key(prefix)] = str(obj).lower()
    elif isinstance(obj, (int, float)):
        out[tag_key(prefix)] = f"{obj:.6g}"
    elif isinstance(obj, str):
        out[tag_key(prefix)] = obj[:500]
    return out


def benchmark_tags(reports: list[str]) -> dict[str, str]:
    """The figures a version is registered with: each report's ``targets`` (its judged
    claims), flattened, as ``bench.<report>.<path>``; reports that do not exist are skipped."""
    tags: dict[str, str] = {}
    for report in reports:
        path = REPO_ROOT / report if not Path(report).is_absolute() else Path(report)
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        figures = data.get("targets", data) if isinstance(data, dict) else {}
        tags.update(flatten(figures, f"bench.{path.stem}"))
    return tags


def dvc_lock_hashes(paths: list[str], lock_file: str | Path = REPO_ROOT / "dvc.lock") -> dict[str, str]:
    """``dvc.<path>``: the md5 dvc.lock records for each output path (``unknown`` if none)."""
    import yaml

    lock_file = Path(lock_file)
    outs: dict[str, str] = {}
    if lock_file.is_file():
        lock = yaml.safe_load(lock_file.read_text()) or {}
        for stage in (lock.get("stages") or {}).values():
            for out in stage.get("outs") or []:
                if out.get("md5"):
                    outs[out["path"]] = out["md5"]
    return {tag_key(f"dvc.{p}"): outs.get(p, "unknown") for p in paths}


def _repo_relative(path: str) -> str:
    try:
        return Path(path).resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def lineage_tags(staged: StagedBundle, bundle_dir: str, reports: list[str]) -> dict[str, str]:
    from budgetdiff.io.fingerprint import unet_fingerprint

    tags = {
        "git_commit": git_commit(),
        SHA_TAG: staged.sha256,
        "bundle_json_sha256": staged.bundle_json_sha256,
        "bundle_source": _repo_relative(bundle_dir),
        "unet_fingerprint": unet_fingerprint(staged.sources["base"]),
    }
    if "student" in staged.sources:
        tags["student_unet_fingerprint"] = unet_fingerprint(staged.sources["student"])
    for rel, ref in staged.shared.items():
        tags[tag_key(f"shared.{rel}.sha256")] = ref["sha256"]
    inputs = [_repo_relative(p) for p in (*staged.sources.values(), bundle_dir)]
    tags.update(dvc_lock_hashes(inputs))
    tags.update(benchmark_tags(reports))
    return tags


# ----------------------------------------------------------------------------------------------
# Versions and aliases
# ----------------------------------------------------------------------------------------------
def versions(client) -> list:
    """Every version of the registered model, newest first ([] when it does not exist)."""
    found = client.search_model_versions(f"name='{MODEL_NAME}'")
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def aliases(client) -> dict[str, str]:
    """{alias: version} (read from the registered model: search results carry no aliases)."""
    from mlflow.exceptions import MlflowException

    try:
        return {a: str(v) for a, v in client.get_registered_model(MODEL_NAME).aliases.items()}
    except MlflowException:
        return {}


def version_by_alias(client, alias: str):
    version = aliases(client).get(alias)
    return client.get_model_version(MODEL_NAME, version) if version else None


def champion_history(client) -> list[dict]:
    from mlflow.exceptions import MlflowException

    try:
        raw = client.get_registered_model(MODEL_NAME).tags.get(HISTORY_TAG)
    except MlflowException:
        return []
    return json.loads(raw) if raw else []


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def set_champion(client, version: str, by: str, history: list[dict] | None = None) -> None:
    """Move ``champion`` to ``version`` and append it to the alias history."""
    history = champion_history(client) if history is None else history
    history = [*history, {"version": str(version), "at": _now(), "by": by}][-100:]
    client.set_registered_model_alias(MODEL_NAME, CHAMPION, str(version))
    client.set_registered_model_tag(MODEL_NAME, HISTORY_TAG, json.dumps(history))
    client.set_model_version_tag(MODEL_NAME, str(version), "champion_since", history[-1]["at"])


def rollback(client) -> dict:
    """Move ``champion`` back to the version that held it before the current one."""
    current = aliases(client).get(CHAMPION)
    if current is None:
        raise RegistryError(f"rollback: {MODEL_NAME} has no champion")
    history = champion_history(client)
    held = [i for i, h in enumerate(history) if h["version"] == str(current)]
    if not held:
        raise RegistryError(f"rollback: champion version {current} is not in the alias history ({HISTORY_TAG})")
    earlier = [j for j in range(held[-1]) if history[j]["version"] != str(current)]
    if not earlier:
        raise RegistryError(f"rollback: version {current} is the first champion; there is none to roll back to")
    target = history[earlier[-1]]["version"]
    kept = history[:earlier[-1] + 1]  # the stack without the current champion: a second rollback goes further back
    client.set_registered_model_alias(MODEL_NAME, CHAMPION, target)
    client.set_registered_model_tag(MODEL_NAME, HISTORY_TAG, json.dumps(kept))
    client.set_model_version_tag(MODEL_NAME, current, "rolled_back_at", _now())
    return {"champion": target, "previous": current}


def register(bundle_dir: str, reports: list[str], client=None) -> dict:
    """Log the bundle at ``bundle_dir`` as a new version of ``budgetdiff`` with alias
    ``challenger``; when a version with the same content hash exists, register nothing and
    return it. Returns {"registered", "version", "bundle_sha256", "run_id"}."""
    import mlflow

    from .artifacts import stage_bundle
    from .model import signature

    client = client or connect()
    exp = experiment_id(client)
    with tempfile.TemporaryDirectory(prefix="budgetdiff-register-") as tmp:
        staged = stage_bundle(bundle_dir, Path(tmp) / "bundle")
        for v in versions(client):
            if v.tags.get(SHA_TAG) == staged.sha256:
                return {"registered": False, "version": str(v.version), "bundle_sha256": staged.sha256,
                        "run_id": v.run_id, "why": f"version {v.version} holds this bundle already"}
        for rel, ref in staged.shared.items():
            staged.set_shared_uri(rel, store_shared_part(client, exp, rel.split("/")[-1], ref["sha256"],
                                                         ref["source"]))
        tags = lineage_tags(staged, bundle_dir, reports)
        entry = str(Path(__file__).with_name("pyfunc_entry.py"))
        with warnings.catch_warnings(), _quiet("mlflow.utils.environment"), \
                mlflow.start_run(experiment_id=exp, run_name=f"register {staged.sha256[:12]}",
                              tags={"git_commit": tags["git_commit"], "dvc_stage": "register",
                                    SHA_TAG: staged.sha256}) as run:
            warnings.simplefilter("ignore")  # no input example / type hints: the signature is explicit
            info = mlflow.pyfunc.log_model(name="bundle", python_model=entry, artifacts={"bundle": str(staged.root)},
                                           signature=signature(), pip_requirements=_pip_requirements(),
                                           metadata={SHA_TAG: staged.sha256})
            for report in reports:
                path = REPO_ROOT / report
                if path.is_file():
                    mlflow.log_artifact(str(path), "benchmarks")
            mv = mlflow.register_model(info.model_uri, MODEL_NAME, tags=tags)
        client.set_registered_model_alias(MODEL_NAME, CHALLENGER, str(mv.version))
    return {"registered": True, "version": str(mv.version), "bundle_sha256": staged.sha256, "run_id": run.info.run_id,
            "left_out": staged.left_out}


def store_shared_part(client, exp: str, name: str, sha: str, source: str) -> str:
    """The ``runs:/`` URI of the frozen part with content hash ``sha``, logged once (in a run of
    its own, tagged with the hash) and found by the hash afterwards."""
    import mlflow

    runs = client.search_runs([exp], filter_string=f"tags.shared_sha256 = '{sha}' and attributes.status = 'FINISHED'",
                              max_results=1)
    if runs:
        return f"runs:/{runs[0].info.run_id}/{name}"
    with mlflow.start_run(experiment_id=exp, run_name=f"{name} {sha[:12]}",
                          tags={"shared_sha256": sha, "shared_part": name, "git_commit": git_commit()}) as run:
        mlflow.log_artifacts(source, name)
    return f"runs:/{run.info.run_id}/{name}"


@contextmanager
def _quiet(logger: str):
    import logging

    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in PIP_PACKAGES:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return out


def describe_versions(client) -> list[dict]:
    """What ``list`` shows: each version with its aliases, bundle hash, gate verdict and the verdict
    per criterion (``gate.criteria``: the promise, floors and no-regression rules)."""
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases(client).items():
        by_version.setdefault(str(version), []).append(alias)
    rows = []
    for v in versions(client):
        t = v.tags
        rows.append({"version": str(v.version), "aliases": sorted(by_version.get(str(v.version), [])),
                     "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000)),
                     "bundle_sha256": t.get(SHA_TAG, "")[:12], "git_commit": t.get("git_commit", "")[:10],
                     "gate": t.get("gate.verdict", "-"), "gate_against": t.get("gate.against", ""),
                     "gate_failed": t.get("gate.failed", ""),
                     "gate_criteria": json.loads(t.get("gate.criteria", "[]"))})
    return rows
