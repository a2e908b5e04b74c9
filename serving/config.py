"""Serve configs: load a YAML profile and check every nested key before it reaches Ray.

A profile is a ``serve deploy`` config (``ServeDeploySchema``): ``http_options`` and one
application whose ``import_path`` is ``serving.app:app`` with the deployments ``ImageIngress``
and ``ImageModel``. Serve validates that schema only shallowly and silently ignores a misspelled
``autoscaling_config`` or ``ray_actor_options`` key, so ``validate_serve_config`` compares every
nested dict against Serve's own schema classes and our ``user_config`` dataclasses, and raises
ValueError naming the bad key by its path, e.g.
``applications[0].deployments[1].autoscaling_config.max_replica: unknown key (did you mean max_replicas?)``.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "cpu.yaml"
APP_IMPORT_PATH = "serving.app:app"
INGRESS = "ImageIngress"
MODEL = "ImageModel"
SHADOW = "ShadowEvaluator"
DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("auto", "float32", "float16", "bfloat16")
BATCHING = ("step", "request")
STEP_POLICIES = ("srpt", "fifo")


# ----------------------------------------------------------------------------------------------
# Our user_config schemas
# ----------------------------------------------------------------------------------------------
def _check_number(name: str, value: Any, kind=float, minimum=None, maximum=None, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and int(value) != value) or not math.isfinite(float(value)):
        raise ValueError(f"{name}: must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: must be <= {maximum}, got {value!r}")
    return kind(value)


def _check_choice(name: str, value: Any, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _known_keys(cls, d: dict, where: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: must be a mapping, got {type(d).__name__}")
    _reject_unknown(d, [f.name for f in fields(cls)], where)


@dataclass(frozen=True)
class ModelOptions:
    """``ImageModel``'s user_config (changeable at run time through ``reconfigure``).

    Args:
        model_source: a local bundle directory (relative paths resolve against the repository), or
            a registry URI once a resolver for its scheme is registered (``serving.sources``).
        skip_policy: a skip-policy JSON that replaces the bundle's (None: the bundle's own).
        device: "cpu", "cuda" or "auto" (CUDA when available).
        dtype: "auto" (fp16 on CUDA, fp32 on CPU), "float32", "float16" or "bfloat16".
        torch_threads: intra-op threads per replica (None: the replica's num_cpus, at least 1).
        batching: "step" (the default): step-level continuous batching. One
            ``budgetdiff.generation.continuous.StepBatcher`` per replica, fed from every call; each denoising
            iteration runs one UNet call over every in-flight image that needs a prediction,
            whatever its plan, and images join and leave at iteration boundaries (docs/serving.md).
            "request": request-level batching as before (``@serve.batch`` collects up to
            ``max_batch_size`` images, ``Generator.run_grouped`` runs each group of equal plans to
            its end); kept as the baseline ``bench_serve`` measures against.
        max_batch_size: request batching: the most images one ``@serve.batch`` call and one
            pipeline call take.
        batch_wait_timeout_s: request batching: how long a batch waits to fill after its first image.
        step_max_rows: step batching: the most UNet rows per call (a guided image takes 2).
        step_max_inflight: step batching: the most images denoising at once in the replica;
            more wait in its queue (admitted first come first served).
        step_max_queue: step batching: the most images waiting for admission in the replica; past
            it a call is refused with the ingress's overload status and Retry-After (null: unbounded,
            only Serve's ``max_queued_requests`` bounds the load).
        step_policy: step batching: which images take the rows: "srpt" (fewest remaining steps
            first) or "fifo" (oldest first); an image passed over ``step_max_wait_iterations``
            times in a row goes first either way.
        step_latency_slack: step batching: null, or how much slower (a fraction) an iteration that
            carries a short request may become because longer ones share it (an online cost model
            t(rows) = a + b·rows predicts it): small on a CPU, where each row costs, null on a GPU.
        step_short_steps: step batching: plans of at most this many steps count as short.
        step_max_wait_iterations: step batching: the starvation guard.
        warmup: run one small generation after loading, before the model takes traffic.
        shadow_sample_rate: the fraction of served images sent to the ShadowEvaluator (0: none).
        shadow_queue_size: sampled images waiting in this replica, at most; more are dropped (counted).
        shadow_max_in_flight: sampled images sent to the evaluator and not yet answered, at most.
        shadow_seed: the sampling coin's seed.
        registry_poll_s: with a registry alias as model_source (``models:/budgetdiff@champion``),
            look the alias up every this many seconds and swap in the version it points at
            (0: only on reconfigure).
    """

    model_source: str = "models/bundle"
    skip_policy: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    torch_threads: int | None = None
    batching: str = "step"
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.02
    step_max_rows: int = 8
    step_max_inflight: int = 16
    step_max_queue: int | None = 64
    step_policy: str = "srpt"
    step_latency_slack: float | None = 0.3
    step_short_steps: int = 16
    step_max_wait_iterations: int = 8
    warmup: bool = True
    shadow_sample_rate: float = 0.0
    shadow_queue_size: int = 32
    shadow_max_in_flight: int = 1
    shadow_seed: int = 0
    registry_poll_s: float = 0.0

    @classmethod
    def from_dict(cls, d: dict | None, where: str = "user_config") -> "ModelOptions":
        d = dict(d or {})
        _known_keys(cls, d, where)
        o = cls(**d)
        if not isinstance(o.model_source, str) or not o.model_source.strip():
            raise ValueError(f"{where}.model_source: must be a non-empty string, got {o.model_source!r}")
        if o.skip_policy is not None and not isinstance(o.skip_policy, str):
            raise ValueError(f"{where}.skip_policy: must be a path or null, got {o.skip_policy!r}")
        _check_choice(f"{where}.device", o.device, DEVICES)
        _check_choice(f"{where}.dtype", o.dtype, DTYPES)
        _check_number(f"{where}.torch_threads", o.torch_threads, int, 1, 256, allow_none=True)
        _check_number(f"{where}.max_batch_size", o.max_batch_size, int, 1, 256)
        _check_number(f"{where}.batch_wait_timeout_s", o.batch_wait_timeout_s, float, 0, 10)
        _check_choice(f"{where}.batching", o.batching, BATCHING)
        _check_number(f"{where}.step_max_rows", o.step_max_rows, int, 2, 4096)
        _check_number(f"{where}.step_max_inflight", o.step_max_inflight, int, 1, 4096)
        _check_number(f"{where}.step_max_queue", o.step_max_queue, int, 10, 1_000_000, allow_none=True)  # n <= 10 must fit
        _check_choice(f"{where}.step_policy", o.step_policy, STEP_POLICIES)
        _check_number(f"{where}.step_latency_slack", o.step_latency_slack, float, 0, 100, allow_none=True)
        _check_number(f"{where}.step_short_steps", o.step_short_steps, int, 1, 1000)
        _check_number(f"{where}.step_max_wait_iterations", o.step_max_wait_iterations, int, 1, 10_000)
        if not isinstance(o.warmup, bool):
            raise ValueError(f"{where}.warmup: must be true or false, got {o.warmup!r}")
        _check_number(f"{where}.shadow_sample_rate", o.shadow_sample_rate, float, 0, 1)
        _check_number(f"{where}.shadow_queue_size", o.shadow_queue_size, int, 1, 100_000)
        _check_number(f"{where}.shadow_max_in_flight", o.shadow_max_in_flight, int, 1, 64)
        _check_number(f"{where}.shadow_seed", o.shadow_seed, int, 0)
        _check_number(f"{where}.registry_poll_s", o.registry_poll_s, float, 0, 86_400)
        return o

    def resolved(self) -> "ModelOptions":
        """The same options with local paths made absolute against the repository root."""
        from .sources import resolve_local_path

        return ModelOptions(**{**asdict(self), "model_source": resolve_local_path(self.model_source),
                               "skip_policy": resolve_local_path(self.skip_policy) if self.skip_policy else None})

    def step_config(self):
        """The ``budgetdiff.generation.continuous.StepBatchConfig`` of the ``step_*`` keys."""
        from budgetdiff.generation.continuous import StepBatchConfig

        return StepBatchConfig(max_rows=self.step_max_rows, max_inflight=self.step_max_inflight,
                               max_queue=self.step_max_queue, policy=self.step_policy,
                               latency_slack=self.step_latency_slack, short_steps=self.step_short_steps,
                               max_wait_iterations=self.step_max_wait_iterations)

    def batching_record(self) -> dict:
        """What a replica says about its batching (``/v1/models``, bench reports)."""
        if self.batching == "request":
            return {"batching": "request", "max_batch_size": self.max_batch_size,
                    "batch_wait_timeout_s": self.batch_wait_timeout_s}
        return {"batching": "step", **self.step_config().to_record()}

    def loads_same_model(self, other: "ModelOptions | None") -> bool:
        """True when ``other`` would load the same weights and policy (only batch settings differ)."""
        keys = ("model_source", "skip_policy", "device", "dtype")
        return other is not None and all(getattr(self, k) == getattr(other, k) for k in keys)


@dataclass(frozen=True)
class IngressOptions:
    """``ImageIngress``'s user_config.

    Args:
        model_id: the model name ``/v1/models`` lists and requests may give as ``model``.
        api_key_env: the environment variable holding the bearer key; when it is set and non-empty
            every ``/v1`` request needs ``Authorization: Bearer <key>`` (401 otherwise).
        request_timeout_s: the ingress's own cap on one request (504 past it); callers cannot
            raise it with ``x-request-timeout-seconds``.
        retry_after_s: the Retry-After (seconds) sent with 429/503 answers.
        overload_status: 503 or 429 when the model's queue is full.
        max_prompt_chars: the longest prompt accepted.
        max_body_bytes: the largest request body accepted (413 past it).
        max_n: the most images one request may ask for (OpenAI: 10).
    """

    model_id: str = "budgetdiff"
    api_key_env: str = "BUDGETDIFF_API_KEY"
    request_timeout_s: float = 120.0
    retry_after_s: float = 2.0
    overload_status: int = 503
    max_prompt_chars: int = 1000
    max_body_bytes: int = 65536
    max_n: int = 10

    @classmethod
    def from_dict(cls, d: dict | None, where: str = "user_config") -> "IngressOptions":
        d = dict(d or {})
        _known_keys(cls, d, where)
        o = cls(**d)
        for key in ("model_id", "api_key_env"):
            if not isinstance(getattr(o, key), str) or not getattr(o, key):
                raise ValueError(f"{where}.{key}: must be a non-empty string, got {getattr(o, key)!r}")
        _check_number(f"{where}.request_timeout_s", o.request_timeout_s, float, 0.1, 3600)
        _check_number(f"{where}.retry_after_s", o.retry_after_s, float, 0, 3600)
        _check_choice(f"{where}.overload_status", o.overload_status, (429, 503))
        _check_number(f"{where}.max_prompt_chars", o.max_prompt_chars, int, 1, 100_000)
        _check_number(f"{where}.max_body_bytes", o.max_body_bytes, int, 256, 100_000_000)
        _check_number(f"{where}.max_n", o.max_n, int, 1, 10)
        return o


@dataclass(frozen=True)
class ShadowOptions:
    """``ShadowEvaluator``'s user_config (monitoring/shadow.py; docs/monitoring.md).

    Args:
        enabled: false: the deployment loads nothing and refuses jobs (the model replicas count
            them as dropped); set ImageModel's shadow_sample_rate to 0 as well to stop sampling.
        model_source: the bundle whose base model renders the reference images (local directory;
            relative paths resolve against the repository). ``with_overrides(model_source=...)``
            sets it together with ImageModel's.
        clip_dir / attributes_dir: the domain CLIP and attribute checker the scorer loads.
        reference_steps: the reference step count (None: the bundle's full steps).
        default_quality_target: the target a request without ``quality_target`` is judged by; None
            (the default): what the bundle's auto policy promised for the route the request ran.
        objective: the quality SLO: the share of sampled requests that must be good.
        window: shadow_score gauges average the last ``window`` evaluations.
        device: "cpu" or "cuda".
        torch_threads: intra-op threads of the evaluator (keep it small: it is low priority).
        nice: niceness added to the evaluator's process (0-19), so serving replicas get the CPU first.
        mlflow_log_every: log verdicts to MLflow every this many evaluations (0: off).
        mlflow_experiment: the MLflow experiment of those runs.
        drift_window: served prompts per drift test window (0: drift off).
        drift_alpha: the drift tests' significance level.
    """

    enabled: bool = True
    model_source: str = "models/bundle"
    clip_dir: str = "models/clip"
    attributes_dir: str = "models/attributes"
    reference_steps: int | None = None
    default_quality_target: float | None = None
    objective: float = 0.95
    window: int = 50
    device: str = "cpu"
    torch_threads: int = 1
    nice: int = 10
    mlflow_log_every: int = 0
    mlflow_experiment: str = "budgetdiff-shadow"
    drift_window: int = 100
    drift_alpha: float = 0.01

    @classmethod
    def from_dict(cls, d: dict | None, where: str = "user_config") -> "ShadowOptions":
        d = dict(d or {})
        _known_keys(cls, d, where)
        o = cls(**d)
        if not isinstance(o.enabled, bool):
            raise ValueError(f"{where}.enabled: must be true or false, got {o.enabled!r}")
        for key in ("model_source", "clip_dir", "attributes_dir", "mlflow_experiment"):
            if not isinstance(getattr(o, key), str) or not getattr(o, key).strip():
                raise ValueError(f"{where}.{key}: must be a non-empty string, got {getattr(o, key)!r}")
        _check_number(f"{where}.reference_steps", o.reference_steps, int, 2, 1000, allow_none=True)
        _check_number(f"{where}.default_quality_target", o.default_quality_target, float, 0.01, 1, allow_none=True)
        _check_number(f"{where}.objective", o.objective, float, 0.5, 0.9999)
        _check_number(f"{where}.window", o.window, int, 1, 100_000)
        _check_choice(f"{where}.device", o.device, ("cpu", "cuda"))
        _check_number(f"{where}.torch_threads", o.torch_threads, int, 1, 256)
        _check_number(f"{where}.nice", o.nice, int, 0, 19)
        _check_number(f"{where}.mlflow_log_every", o.mlflow_log_every, int, 0, 100_000)
        _check_number(f"{where}.drift_window", o.drift_window, int, 0, 100_000)
        if 0 < o.drift_window < 10:
            raise ValueError(f"{where}.drift_window: must be 0 (off) or >= 10, got {o.drift_window}")
        _check_number(f"{where}.drift_alpha", o.drift_alpha, float, 1e-6, 0.5)
        return o

    def resolved(self) -> "ShadowOptions":
        from .sources import resolve_local_path

        return ShadowOptions(**{**asdict(self), **{k: resolve_local_path(getattr(self, k))
                                                   for k in ("model_source", "clip_dir", "attributes_dir")}})


USER_CONFIGS = {INGRESS: IngressOptions, MODEL: ModelOptions, SHADOW: ShadowOptions}


# ----------------------------------------------------------------------------------------------
# Validation against Serve's schema classes
# ----------------------------------------------------------------------------------------------
def _field_names(model_cls) -> list[str]:
    names = []
    for name, f in model_cls.model_fields.items():
        names.append(name)
        if f.alias:
            names.append(f.alias)
    return names


def _reject_unknown(d: dict, allowed, where: str) -> None:
    allowed = list(allowed)
    for key in d:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(sorted(allowed))})"
            raise ValueError(f"{where}.{key}: unknown key{hint}")


def _pydantic(cls, d: dict, where: str):
    from pydantic import ValidationError

    try:
        return cls(**d)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        raise ValueError(f"{where}{'.' + loc if loc else ''}: {err.get('msg')}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def _validate_deployment(dep: dict, where: str) -> None:
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, BackpressureConfig
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema

    if not isinstance(dep, dict):
        raise ValueError(f"{where}: must be a mapping")
    name = dep.get("name")
    if name not in USER_CONFIGS:
        raise ValueError(f"{where}.name: unknown deployment {name!r}; {APP_IMPORT_PATH} has "
                         f"{', '.join(USER_CONFIGS)}")
    where = f"{where}({name})"
    _reject_unknown(dep, _field_names(DeploymentSchema), where)
    if "num_replicas" in dep and dep["num_replicas"] != "auto" and "autoscaling_config" in dep:
        raise ValueError(f"{where}.num_replicas: give either num_replicas or autoscaling_config, not both")
    auto = dep.get("autoscaling_config")
    if auto is not None:
        if not isinstance(auto, dict):
            raise ValueError(f"{where}.autoscaling_config: must be a mapping")
        _reject_unknown(auto, _field_names(AutoscalingConfig), f"{where}.autoscaling_config")
        if isinstance(auto.get("policy"), dict):
            _reject_unknown(auto["policy"], _field_names(AutoscalingPolicy), f"{where}.autoscaling_config.policy")
        _pydantic(AutoscalingConfig, auto, f"{where}.autoscaling_config")
    actor = dep.get("ray_actor_options")
    if actor is not None:
        if not isinstance(actor, dict):
            raise ValueError(f"{where}.ray_actor_options: must be a mapping")
        _reject_unknown(actor, _field_names(RayActorOptionsSchema), f"{where}.ray_actor_options")
        _pydantic(RayActorOptionsSchema, actor, f"{where}.ray_actor_options")
    if dep.get("backpressure_config") is not None:
        _pydantic(BackpressureConfig, dep["backpressure_config"], f"{where}.backpressure_config")
    options = USER_CONFIGS[name].from_dict(dep.get("user_config"), f"{where}.user_config")
    if name == MODEL:
        ongoing = dep.get("max_ongoing_requests", 5)  # Serve's default
        if options.batching == "request" and isinstance(ongoing, int) and ongoing < options.max_batch_size:
            raise ValueError(f"{where}.max_ongoing_requests: {ongoing} < user_config.max_batch_size "
                             f"{options.max_batch_size}; a batch could never fill")
        if options.batching == "step" and isinstance(ongoing, int) and ongoing < options.step_max_inflight:
            raise ValueError(f"{where}.max_ongoing_requests: {ongoing} < user_config.step_max_inflight "
                             f"{options.step_max_inflight}; one-image calls could never fill the denoising pool")
        # a replica asking for a GPU on a machine without one stays pending forever
        gpus = (actor or {}).get("num_gpus", 0) or 0
        if options.device == "cuda" and not gpus:
            raise ValueError(f"{where}.ray_actor_options.num_gpus: device cuda needs num_gpus >= 1")
        if options.device == "cpu" and gpus:
            raise ValueError(f"{where}.user_config.device: num_gpus is {gpus} but device is cpu")
    if name == SHADOW:
        gpus = (actor or {}).get("num_gpus", 0) or 0
        if options.enabled and options.device == "cuda" and not gpus:
            raise ValueError(f"{where}.ray_actor_options.num_gpus: device cuda needs num_gpus > 0")
        if dep.get("num_replicas") not in (None, 1) or "autoscaling_config" in dep:
            raise ValueError(f"{where}.num_replicas: the shadow evaluator runs as exactly one replica "
                             f"(its SLO window and MLflow run live in it)")


def validate_serve_config(config: dict) -> dict:
    """Check a Serve deploy config (nested keys included); return it unchanged. Raises ValueError
    whose message starts with the path of the offending key."""
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    if not isinstance(config, dict):
        raise ValueError("config: must be a mapping")
    _reject_unknown(config, _field_names(ServeDeploySchema), "config")
    http = config.get("http_options") or {}
    if not isinstance(http, dict):
        raise ValueError("config.http_options: must be a mapping")
    _reject_unknown(http, _field_names(HTTPOptionsSchema), "config.http_options")
    apps = config.get("applications")
    if not isinstance(apps, list) or not apps:
        raise ValueError("config.applications: must be a non-empty list")
    for i, app in enumerate(apps):
        where = f"applications[{i}]"
        if not isinstance(app, dict):
            raise ValueError(f"{where}: must be a mapping")
        _reject_unknown(app, _field_names(ServeApplicationSchema), where)
        if app.get("import_path") != APP_IMPORT_PATH:
            raise ValueError(f"{where}.import_path: must be {APP_IMPORT_PATH}, got {app.get('import_path')!r}")
        deployments = app.get("deployments") or []
        if not isinstance(deployments, list):
            raise ValueError(f"{where}.deployments: must be a list")
        names = [d.get("name") for d in deployments if isinstance(d, dict)]
        if len(set(names)) != len(names):
            raise ValueError(f"{where}.deployments: a deployment is named twice ({names})")
        for j, dep in enumerate(deployments):
            _validate_deployment(dep, f"{where}.deployments[{j}]")
    _pydantic(ServeDeploySchema, config, "config")
    return config


# ----------------------------------------------------------------------------------------------
# Loading, overriding and resolving
# ----------------------------------------------------------------------------------------------
def load_serve_config(path: str | os.PathLike = DEFAULT_CONFIG) -> dict:
    """Read and validate a YAML profile."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config: {str(path)!r} does not exist (profiles: "
                         f"{', '.join(p.name for p in sorted(CONFIG_DIR.glob('*.yaml')))})")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"config: {str(path)!r} is not valid YAML ({exc})") from None
    return validate_serve_config(config)


def deployment(config: dict, name: str, app: int = 0) -> dict:
    """The deployment dict named ``name`` in application ``app`` (created when absent)."""
    deps = config["applications"][app].setdefault("deployments", [])
    for d in deps:
        if d.get("name") == name:
            return d
    deps.append({"name": name})
    return deps[-1]


def with_overrides(config: dict, *, http_port: int | None = None, host: str | None = None,
                   model_source: str | None = None, model: dict | None = None,
                   ingress: dict | None = None, shadow: dict | None = None,
                   deployments: dict | None = None) -> dict:
    """A validated copy of ``config`` with ports, the model source (the model's and the shadow's),
    user_config keys (``model``, ``ingress``, ``shadow``) or whole deployment keys
    (``deployments={name: {key: value}}``) replaced."""
    config = copy.deepcopy(config)
    http = config.setdefault("http_options", {})
    if http_port is not None:
        http["port"] = int(http_port)
    if host is not None:
        http["host"] = host
    if model_source is not None:
        model = {**(model or {}), "model_source": model_source}
        if any(d.get("name") == SHADOW for d in config["applications"][0].get("deployments") or []):
            shadow = {"model_source": model_source, **(shadow or {})}
    for name, extra in ((MODEL, model), (INGRESS, ingress), (SHADOW, shadow)):
        if extra:
            dep = deployment(config, name)
            dep["user_config"] = {**(dep.get("user_config") or {}), **extra}
    for name, extra in (deployments or {}).items():
        dep = deployment(config, name)
        for key, value in extra.items():
            if value is None:
                dep.pop(key, None)
            else:
                dep[key] = value
    return validate_serve_config(config)


def resolve_paths(config: dict) -> dict:
    """A copy whose model paths are absolute (replicas do not run in the repository directory)."""
    config = copy.deepcopy(config)
    for app in config["applications"]:
        for dep in app.get("deployments") or []:
            if dep.get("name") == MODEL:
                options = ModelOptions.from_dict(dep.get("user_config")).resolved()
                dep["user_config"] = {**(dep.get("user_config") or {}),
                                      "model_source": options.model_source,
                                      "skip_policy": options.skip_policy}
            elif dep.get("name") == SHADOW:
                shadow = ShadowOptions.from_dict(dep.get("user_config")).resolved()
                dep["user_config"] = {**(dep.get("user_config") or {}),
                                      **{k: getattr(shadow, k) for k in ("model_source", "clip_dir", "attributes_dir")}}
    return config


def user_config(config: dict, name: str, app: int = 0):
    """The parsed user_config options of deployment ``name``."""
    return USER_CONFIGS[name].from_dict(deployment(copy.deepcopy(config), name, app).get("user_config"))
