"""``python -m infra.render``: the KubeRay ``RayService`` and the Prometheus ``PodMonitor``, generated.

The Serve config has one source of truth, ``serving/configs/gpu.yaml``; the RayService's
``serveConfigV2`` is that file, validated (``serving.config``) and adapted only where a cluster
needs it:

1. ``http_options.host`` becomes ``0.0.0.0`` (the KubeRay serve Service must reach the proxies);
2. which bundle is served (the files' header says it):

   - a path inside the image (the default ``models/bundle``: the bundle ``dvc repro`` built, which
     its ``register`` stage makes the registry's ``champion`` when the gate passes; relative paths
     resolve against ``/app``) replaces both ``model_source`` values as it is
     (``serving.config.with_overrides``);
   - a pinned MLflow registry URI (``--model-source models:/budgetdiff/7``, or an alias without
     ``--registry-poll-s``): the GPU worker pods get an init container that fetches that version
     into ``/var/lib/budgetdiff/bundle`` (an emptyDir; ``infra/docker/entrypoint.sh`` ->
     ``python -m registry fetch``) and the ``model_source`` of ``ImageModel`` and
     ``ShadowEvaluator`` becomes that directory: every pod of a new cluster serves the one version;
   - an alias followed in place (``--model-source models:/budgetdiff@champion --registry-poll-s 60``,
     or a config whose ``ImageModel`` has such a source and ``registry_poll_s > 0``): no init
     container; both deployments keep the alias (each replica resolves it when it loads) and
     ``ImageModel`` looks it up every ``registry_poll_s`` seconds and swaps in the version it
     names, as the local profile does; ``MLFLOW_TRACKING_URI`` is then required.

Everything else about the cluster is derived from the same config: the serve port, the API-key
variable (the ingress's ``api_key_env``), and the GPU worker group's size: ``minReplicas`` /
``maxReplicas`` are the worker pods (1 GPU, ``--worker-cpus`` CPUs each) that hold every
deployment's replicas at its min / max (``autoscaling_config`` or ``num_replicas``) with its
``ray_actor_options``. ``rayVersion`` is the ray version locked in ``uv.lock``.

    python -m infra.render                 # writes infra/k8s/rayservice.yaml and podmonitor.yaml
    python -m infra.render --check         # exit 1, one line, when the committed files are stale
    python -m infra.render --image REG/budgetdiff-gpu:TAG --model-source models:/budgetdiff/7 --out-dir deploy/
    python -m infra.render --model-source models:/budgetdiff@champion --registry-poll-s 60 --out-dir deploy/

Before anything is written the manifests pass ``infra.checks`` (the CRD schema, unknown keys,
``ray start`` options, ``serveConfigV2`` against Serve's schema and ours). Bad input exits 2 with
one line naming it; files are replaced atomically.
"""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from budgetdiff.io import atomic_write_bytes
from mlops.cli import ArgumentParser, print_error
from mlops.repo import REPO_ROOT

DEFAULT_CONFIG = REPO_ROOT / "serving" / "configs" / "gpu.yaml"
DEFAULT_OUT_DIR = REPO_ROOT / "infra" / "k8s"
RAYSERVICE_FILE = "rayservice.yaml"
PODMONITOR_FILE = "podmonitor.yaml"

APP_DIR = "/app"                        # the image's WORKDIR (infra/docker/Dockerfile)
ENTRYPOINT = f"{APP_DIR}/infra/docker/entrypoint.sh"
DATA_DIR = "/var/lib/budgetdiff"        # emptyDir on GPU worker pods
BUNDLE_DIR = f"{DATA_DIR}/bundle"       # where a registry version is fetched to
REGISTRY_SCHEME = "models:/"

CONFIGMAP = "budgetdiff-config"         # kubectl create configmap (docs/kubernetes.md)
CONFIGMAP_MLFLOW_KEY = "mlflow-tracking-uri"
SECRET = "budgetdiff-secrets"           # kubectl create secret generic
SECRET_API_KEY = "api-key"

GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, METRICS_PORT = 6379, 8265, 10001, 8080
GPU_RESOURCE = "nvidia.com/gpu"
GPUS_PER_WORKER = 1
GPU_GROUP = "gpu-workers"
PART_OF_LABEL = "app.kubernetes.io/part-of"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
PART_OF = "budgetdiff"
LATENCY_ENV = "RAY_SERVE_REQUEST_LATENCY_BUCKETS_MS"


def _project_version() -> str:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


def locked_version(package: str, lock: Path = REPO_ROOT / "uv.lock") -> str:
    """``package``'s version in uv.lock (ValueError when it is not locked)."""
    for pkg in tomllib.loads(lock.read_text()).get("package", []):
        if pkg.get("name") == package:
            return pkg["version"]
    raise ValueError(f"uv.lock: {package} is not locked")


@dataclass(frozen=True)
class RenderOptions:
    """What a rendering may change; the defaults give the committed ``infra/k8s/`` files.

    Args:
        config: the Serve profile (a GPU one: ``ImageModel`` needs ``num_gpus``).
        model_source: replaces ``ImageModel``'s ``model_source`` (None: the config's).
        registry_poll_s: with a ``models:/NAME@ALIAS`` source, follow the alias in place, looking
            it up every this many seconds (None: the config's ``registry_poll_s``; 0 with an alias:
            fetch the version it names when a pod starts).
        image: the GPU image (``infra/docker/Dockerfile``) for the head, the workers and the
            autoscaler.
        name: the RayService's name (and the ``app.kubernetes.io/instance`` label of its pods).
        head_cpus, head_memory: the head pod (GCS, dashboard, Serve controller; ``num-cpus: 0``
            keeps replicas off it).
        worker_cpus, worker_memory: one GPU worker pod (``nvidia.com/gpu: 1``).
    """

    config: Path = DEFAULT_CONFIG
    model_source: str | None = None
    registry_poll_s: float | None = None
    image: str = field(default_factory=lambda: f"budgetdiff-gpu:{_project_version()}")
    name: str = "budgetdiff"
    head_cpus: int = 2
    head_memory: str = "8Gi"
    worker_cpus: int = 4
    worker_memory: str = "16Gi"

    def __post_init__(self):
        object.__setattr__(self, "config", Path(self.config).resolve())

    def non_default_args(self) -> list[str]:
        """The command-line options that reproduce these options (for the files' header)."""
        default = RenderOptions()
        args = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value != getattr(default, f.name):
                if f.name == "config":
                    value = _display(Path(value))
                args.append(f"--{f.name.replace('_', '-')} {value}")
        return args


def _display(path: Path) -> str:
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def is_registry_uri(source: str) -> bool:
    return source.startswith(REGISTRY_SCHEME)


def latency_buckets_env() -> str:
    """``monitoring.names.LATENCY_MS_BUCKETS`` as Ray Serve parses it (comma-separated ms)."""
    from monitoring.names import LATENCY_MS_BUCKETS

    return ",".join(f"{b:g}" if float(b) != int(b) else str(int(b)) for b in LATENCY_MS_BUCKETS)


# ----------------------------------------------------------------------------------------------
# serveConfigV2
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Replicas:
    """One deployment's replica bounds and per-replica resources (``ray_actor_options``)."""

    name: str
    min: int
    max: int
    num_cpus: float
    num_gpus: float


@dataclass(frozen=True)
class ClusterServeConfig:
    """The Serve config as the cluster runs it, and what the pods need to know about it."""

    config: dict
    registry_source: str | None  # a models:/ URI the init container fetches (None: nothing to fetch)
    http_port: int
    api_key_env: str
    deployments: tuple[Replicas, ...]
    follows: str | None = None   # a models:/NAME@ALIAS the replicas follow in place (None: they do not)
    served: str = ""             # which bundle is served, in words (the manifests' header)


def _replicas(dep: dict, where: str) -> Replicas:
    auto = dep.get("autoscaling_config")
    if auto:
        lo, hi = int(auto.get("min_replicas", 1)), int(auto.get("max_replicas", 1))
    else:
        n = dep.get("num_replicas", 1)
        if n == "auto":
            raise ValueError(f"{where}.num_replicas: 'auto' hides the replica bounds; give an autoscaling_config "
                             "with min_replicas and max_replicas so the GPU worker group can be sized")
        lo = hi = int(n)
    actor = dep.get("ray_actor_options") or {}
    # Serve's defaults: a replica takes 1 CPU and no GPU unless its ray_actor_options say otherwise
    return Replicas(dep["name"], lo, hi, float(actor.get("num_cpus", 1)), float(actor.get("num_gpus") or 0))


def cluster_serve_config(config_path: Path | str = DEFAULT_CONFIG, model_source: str | None = None,
                         registry_poll_s: float | None = None) -> ClusterServeConfig:
    """Load and validate the profile, apply the cluster adaptations (module docstring), validate again."""
    from serving.config import INGRESS, MODEL, load_serve_config, user_config, with_overrides

    cfg = load_serve_config(config_path)
    where = _display(Path(config_path))
    options = user_config(cfg, MODEL)
    source = model_source if model_source is not None else options.model_source
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"--model-source: must be a non-empty string, got {source!r}")
    if ":/" in source and not is_registry_uri(source):
        raise ValueError(f"--model-source: {source!r} is neither a path in the image nor a {REGISTRY_SCHEME} "
                         "registry URI")
    registry = source if is_registry_uri(source) else None
    if registry and not registry[len(REGISTRY_SCHEME):].strip("/"):
        raise ValueError(f"--model-source: {source!r} names no model (models:/NAME@ALIAS or models:/NAME/VERSION)")
    if registry_poll_s is not None and (not isinstance(registry_poll_s, (int, float)) or registry_poll_s < 0):
        raise ValueError(f"--registry-poll-s: must be a number >= 0, got {registry_poll_s!r}")
    poll = float(registry_poll_s) if registry_poll_s is not None else (
        options.registry_poll_s if model_source is None else 0.0)
    if registry_poll_s and not (registry and "@" in registry):
        raise ValueError(f"--registry-poll-s: follows a registry alias (models:/NAME@ALIAS); the model source "
                         f"is {source!r}")
    follows = registry if registry and "@" in registry and poll > 0 else None
    if follows:  # way 2: the replicas resolve the alias themselves and follow it
        cfg = with_overrides(cfg, host="0.0.0.0", model_source=source, model={"registry_poll_s": poll})
        registry = None
        served = f"{follows}, followed in place: each ImageModel replica looks the alias up every {poll:g} s"
    elif registry:  # way 1: one version, fetched by an init container when a pod starts
        cfg = with_overrides(cfg, host="0.0.0.0", model_source=BUNDLE_DIR)
        served = f"{registry}, fetched into {BUNDLE_DIR} by the init container when a pod starts"
    else:
        cfg = with_overrides(cfg, host="0.0.0.0", model_source=model_source)
        served = (f"{source} in the image" + (" (the bundle dvc repro built; its register stage makes it the "
                                               "registry's champion when the gate passes)"
                                               if source.rstrip("/") == "models/bundle" else ""))

    deps = tuple(_replicas(d, f"{where}: {d['name']}") for d in cfg["applications"][0].get("deployments") or [])
    model = next(d for d in deps if d.name == MODEL)
    if not 0 < model.num_gpus <= GPUS_PER_WORKER:
        raise ValueError(f"{where}: {MODEL}.ray_actor_options.num_gpus is {model.num_gpus:g}; the GPU worker group "
                         f"({GPUS_PER_WORKER} GPU per pod) needs 0 < num_gpus <= {GPUS_PER_WORKER}: render a GPU "
                         "profile such as serving/configs/gpu.yaml")
    for d in deps:
        if d.num_gpus > GPUS_PER_WORKER:
            raise ValueError(f"{where}: {d.name}.ray_actor_options.num_gpus {d.num_gpus:g} > {GPUS_PER_WORKER} "
                             "GPU per worker pod")
    return ClusterServeConfig(config=cfg, registry_source=registry, follows=follows, served=served,
                              http_port=int((cfg.get("http_options") or {}).get("port", 8000)),
                              api_key_env=user_config(cfg, INGRESS).api_key_env, deployments=deps)


def _workers_needed(replicas: list[tuple[str, float, float]], worker_cpus: int) -> int:
    """GPU worker pods for ``replicas`` [(name, cpus, gpus)], first-fit decreasing (GPUs first)."""
    free: list[list[float]] = []  # [cpus, gpus] left per worker
    for name, cpus, gpus in sorted(replicas, key=lambda r: (-r[2], -r[1])):
        if cpus > worker_cpus:
            raise ValueError(f"--worker-cpus: {worker_cpus} < {name}'s num_cpus {cpus:g}; the head has "
                             "num-cpus 0, so every replica runs on a GPU worker")
        for slot in free:
            if slot[0] + 1e-9 >= cpus and slot[1] + 1e-9 >= gpus:
                slot[0] -= cpus
                slot[1] -= gpus
                break
        else:
            free.append([worker_cpus - cpus, GPUS_PER_WORKER - gpus])
    return max(1, len(free))


def worker_group_bounds(serve: ClusterServeConfig, worker_cpus: int) -> tuple[int, int]:
    """(minReplicas, maxReplicas) of the GPU worker group: the pods that hold every deployment's
    replicas at their min and at their max (the head has ``num-cpus: 0`` and no GPU, so nothing
    runs there but the proxy and the Serve controller)."""
    def at(bound: str) -> int:
        return _workers_needed([(d.name, d.num_cpus, d.num_gpus) for d in serve.deployments
                                for _ in range(getattr(d, bound))], worker_cpus)
    return at("min"), at("max")


# ----------------------------------------------------------------------------------------------
# The manifests
# ----------------------------------------------------------------------------------------------
def pod_labels(opts: RenderOptions, component: str) -> dict:
    """The labels set on a pod template (KubeRay adds ray.io/cluster, ray.io/node-type, ...)."""
    return {PART_OF_LABEL: PART_OF, INSTANCE_LABEL: opts.name, COMPONENT_LABEL: component}


def _env(serve: ClusterServeConfig) -> list[dict]:
    return [
        {"name": LATENCY_ENV, "value": latency_buckets_env()},
        {"name": "MLFLOW_TRACKING_URI", "valueFrom": {"configMapKeyRef": {
            "name": CONFIGMAP, "key": CONFIGMAP_MLFLOW_KEY,
            "optional": serve.registry_source is None and serve.follows is None}}},
        # the ingress reads its key from the variable its user_config names; without it the API is open
        {"name": serve.api_key_env, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": SECRET_API_KEY}}},
    ]


def _resources(cpus: int | str, memory: str, gpus: int = 0) -> dict:
    res = {"cpu": str(cpus), "memory": memory}
    if gpus:
        res[GPU_RESOURCE] = gpus
    return {"requests": dict(res), "limits": dict(res)}


def build_rayservice(opts: RenderOptions, serve: ClusterServeConfig | None = None) -> dict:
    serve = serve or cluster_serve_config(opts.config, opts.model_source, opts.registry_poll_s)
    lo, hi = worker_group_bounds(serve, opts.worker_cpus)
    env = _env(serve)
    metrics = {"metrics-export-port": str(METRICS_PORT)}

    head = {
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0", **metrics},
        "template": {
            "metadata": {"labels": pod_labels(opts, "ray-head")},
            "spec": {"containers": [{
                "name": "ray-head", "image": opts.image, "imagePullPolicy": "IfNotPresent",
                "ports": [{"name": "gcs-server", "containerPort": GCS_PORT},
                          {"name": "dashboard", "containerPort": DASHBOARD_PORT},
                          {"name": "client", "containerPort": CLIENT_PORT},
                          {"name": "serve", "containerPort": serve.http_port},
                          {"name": "metrics", "containerPort": METRICS_PORT}],
                "env": env,
                "resources": _resources(opts.head_cpus, opts.head_memory),
            }]},
        },
    }

    worker_container = {
        "name": "ray-worker", "image": opts.image, "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "serve", "containerPort": serve.http_port},
                  {"name": "metrics", "containerPort": METRICS_PORT}],
        "env": env,
        "resources": _resources(opts.worker_cpus, opts.worker_memory, GPUS_PER_WORKER),
    }
    worker_spec: dict = {
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [worker_container],
    }
    if serve.registry_source:
        mount = [{"name": "budgetdiff-data", "mountPath": DATA_DIR}]
        worker_container["volumeMounts"] = mount
        worker_spec["initContainers"] = [{
            "name": "fetch-model", "image": opts.image, "imagePullPolicy": "IfNotPresent",
            "command": [ENTRYPOINT],
            "env": [{"name": "BUDGETDIFF_MODEL_SOURCE", "value": serve.registry_source},
                    {"name": "BUDGETDIFF_BUNDLE_DIR", "value": BUNDLE_DIR},
                    {"name": "MLFLOW_TRACKING_URI", "valueFrom": {"configMapKeyRef": {
                        "name": CONFIGMAP, "key": CONFIGMAP_MLFLOW_KEY}}}],
            "volumeMounts": mount,
            "resources": _resources(1, "4Gi"),
        }]
        worker_spec["volumes"] = [{"name": "budgetdiff-data", "emptyDir": {"sizeLimit": "20Gi"}}]
    worker = {
        "groupName": GPU_GROUP, "replicas": lo, "minReplicas": lo, "maxReplicas": hi,
        "rayStartParams": dict(metrics),
        "template": {"metadata": {"labels": pod_labels(opts, "ray-gpu-worker")}, "spec": worker_spec},
    }

    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": opts.name, "labels": {PART_OF_LABEL: PART_OF, INSTANCE_LABEL: opts.name}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve.config, sort_keys=False, width=1000),
            "excludeHeadPodFromServeSvc": True,  # the head (num-cpus 0) hosts no replica
            "rayClusterConfig": {
                "rayVersion": locked_version("ray"),
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": 120,
                    "imagePullPolicy": "IfNotPresent",
                    "resources": _resources("500m", "512Mi"),
                },
                "headGroupSpec": head,
                "workerGroupSpecs": [worker],
            },
        },
    }


def build_podmonitor(opts: RenderOptions) -> dict:
    """Scrape Ray's metrics port on the RayService's head and GPU worker pods."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": f"{opts.name}-ray",
                     # kube-prometheus-stack selects PodMonitors by its Helm release label
                     "labels": {PART_OF_LABEL: PART_OF, INSTANCE_LABEL: opts.name, "release": "prometheus"}},
        "spec": {
            "selector": {
                "matchLabels": {PART_OF_LABEL: PART_OF, INSTANCE_LABEL: opts.name},
                "matchExpressions": [{"key": "ray.io/node-type", "operator": "In", "values": ["head", "worker"]}],
            },
            "podMetricsEndpoints": [{
                "port": "metrics", "path": "/metrics", "interval": "15s",
                "relabelings": [
                    {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"], "targetLabel": "ray_io_cluster"},
                    {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_node_type"], "targetLabel": "ray_node_type"},
                ],
            }],
        },
    }


# ----------------------------------------------------------------------------------------------
# Text, checks, files
# ----------------------------------------------------------------------------------------------
class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # every container spells its env out: no &id001 anchors
        return True


def _str(dumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(obj: dict) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=1000, default_flow_style=False)


def _header(opts: RenderOptions, what: str, served: str) -> str:
    cmd = " ".join(["python -m infra.render", *opts.non_default_args()])
    return (f"# GENERATED by `{cmd}` from {_display(Path(opts.config))}: do not edit by hand.\n"
            f"# {what}\n"
            f"# Serves: {served}.\n"
            "# Edit the serve config (or the render options) and re-run the command; `--check` tells a stale file.\n")


def check_manifests(rayservice: dict, podmonitor: dict) -> None:
    """Raise ValueError (one line: the first problem and how many there are) unless both pass."""
    from .checks import rayservice_errors, selector_matches, unknown_podmonitor_keys

    errors = rayservice_errors(rayservice) + unknown_podmonitor_keys(podmonitor)
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [("worker", g) for g in cluster["workerGroupSpecs"]]
    for node_type, group in groups:
        labels = {**group["template"]["metadata"]["labels"], "ray.io/node-type": node_type}
        if not selector_matches(podmonitor["spec"]["selector"], labels):
            errors.append(f"podmonitor.spec.selector: does not select the {node_type} pods ({labels})")
        ports = {p["name"] for c in group["template"]["spec"]["containers"] for p in c.get("ports", [])}
        if "metrics" not in ports:
            errors.append(f"{node_type}: no container port named metrics for the PodMonitor")
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ValueError(errors[0] + more)


def render(opts: RenderOptions | None = None) -> dict[str, str]:
    """{file name: text} of the checked manifests."""
    opts = opts or RenderOptions()
    serve = cluster_serve_config(opts.config, opts.model_source, opts.registry_poll_s)
    rayservice, podmonitor = build_rayservice(opts, serve), build_podmonitor(opts)
    check_manifests(rayservice, podmonitor)
    return {
        RAYSERVICE_FILE: _header(opts, "KubeRay RayService: CPU head + autoscaling GPU workers; serveConfigV2 is "
                                       "the serve config adapted for the cluster (infra/render.py).", serve.served)
                         + to_yaml(rayservice),
        PODMONITOR_FILE: _header(opts, "Prometheus Operator PodMonitor: Ray's metrics port on the RayService's pods.",
                                 serve.served)
                         + to_yaml(podmonitor),
    }


def stale_files(texts: dict[str, str], out_dir: Path) -> list[str]:
    """The files under ``out_dir`` that are missing or differ from ``texts``."""
    return [name for name, text in texts.items()
            if not (out_dir / name).is_file() or (out_dir / name).read_text() != text]


def build_parser() -> argparse.ArgumentParser:
    d = RenderOptions()
    p = ArgumentParser(prog="python -m infra.render", description="Render the KubeRay RayService and the PodMonitor "
                "from the serve config into infra/k8s/.")
    p.add_argument("--config", type=Path, default=d.config, help="serve profile (default: serving/configs/gpu.yaml)")
    p.add_argument("--model-source", default=None, help="ImageModel's model_source: a path in the image or a "
                   "models:/NAME@ALIAS | models:/NAME/VERSION registry URI (default: the config's)")
    p.add_argument("--registry-poll-s", type=float, default=None,
                   help="with --model-source models:/NAME@ALIAS: the replicas follow the alias, looking it up every N "
                        "seconds (no init container); default: the config's registry_poll_s")
    p.add_argument("--image", default=d.image, help=f"the GPU image (default: {d.image})")
    p.add_argument("--name", default=d.name, help="the RayService's name")
    p.add_argument("--head-cpus", type=int, default=d.head_cpus)
    p.add_argument("--head-memory", default=d.head_memory)
    p.add_argument("--worker-cpus", type=int, default=d.worker_cpus)
    p.add_argument("--worker-memory", default=d.worker_memory)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where the manifests go (default: infra/k8s)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file there differs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = RenderOptions(config=args.config, model_source=args.model_source, registry_poll_s=args.registry_poll_s,
                         image=args.image, name=args.name,
                         head_cpus=args.head_cpus, head_memory=args.head_memory, worker_cpus=args.worker_cpus,
                         worker_memory=args.worker_memory)
    try:
        texts = render(opts)
    except ValueError as exc:
        return print_error(str(exc).strip().splitlines()[0])
    out_dir = Path(args.out_dir)
    if args.check:
        stale = stale_files(texts, out_dir)
        if stale:
            cmd = " ".join(["python -m infra.render", *opts.non_default_args()])
            print_error(f"{', '.join(_display(out_dir / n) for n in stale)} differ(s) from a fresh render of "
                        f"{_display(Path(opts.config))}; run: {cmd}")
            return 1  # the check failed (not a usage error)
        print(f"up to date: {', '.join(_display(out_dir / n) for n in texts)}")
        return 0
    for name, text in texts.items():
        atomic_write_bytes(out_dir / name, text.encode())
        print(f"wrote {_display(out_dir / name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
