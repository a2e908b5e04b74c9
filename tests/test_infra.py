"""infra/: the KubeRay RayService and PodMonitor rendered from serving/configs/gpu.yaml, their offline
checks, the GPU Dockerfile and its entrypoint, and fetching a registered bundle.

Nothing here needs a cluster, Docker or the network: the manifests are checked against the
KubeRay v1.7.0 CRD schema (a copy in infra/schemas/), our unknown-key walk, `ray start`'s options
and Ray Serve's schema; the Dockerfile is checked as text; the fetch runs against a temporary
sqlite registry holding a tiny bundle."""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import subprocess
import sys
import tomllib
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import REPO

from infra import checks, render
from infra.render import RenderOptions

GPU_YAML = REPO / "serving" / "configs" / "gpu.yaml"
K8S = REPO / "infra" / "k8s"
DOCKER = REPO / "infra" / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    return render.render()


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return yaml.safe_load((K8S / render.RAYSERVICE_FILE).read_text())


@pytest.fixture(scope="module")
def podmonitor() -> dict:
    return yaml.safe_load((K8S / render.PODMONITOR_FILE).read_text())


def _cluster(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterConfig"]


def _worker(manifest: dict) -> dict:
    groups = _cluster(manifest)["workerGroupSpecs"]
    assert len(groups) == 1
    return groups[0]


def _containers(manifest: dict) -> dict[str, dict]:
    c = _cluster(manifest)
    return {"head": c["headGroupSpec"]["template"]["spec"]["containers"][0],
            "worker": _worker(manifest)["template"]["spec"]["containers"][0]}


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ----------------------------------------------------------------------------------------------
# One source of truth: the committed files are a fresh render
# ----------------------------------------------------------------------------------------------
def test_committed_manifests_equal_a_fresh_render(texts):
    for name, text in texts.items():
        committed = (K8S / name).read_text()
        assert committed == text, f"infra/k8s/{name} is stale: run `python -m infra.render`"


def test_check_flag_and_atomic_write(tmp_path, capsys):
    assert render.main(["--out-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [render.PODMONITOR_FILE, render.RAYSERVICE_FILE]  # no temp files
    assert render.main(["--check", "--out-dir", str(tmp_path)]) == 0
    capsys.readouterr()

    path = tmp_path / render.RAYSERVICE_FILE
    path.write_text(path.read_text().replace("maxReplicas: ", "maxReplicas: 1"))  # a hand edit
    assert render.main(["--check", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and render.RAYSERVICE_FILE in err and "python -m infra.render" in err
    assert render.PODMONITOR_FILE not in err

    (tmp_path / render.PODMONITOR_FILE).unlink()
    assert render.main(["--check", "--out-dir", str(tmp_path)]) == 1
    assert render.PODMONITOR_FILE in capsys.readouterr().err


def test_check_reproduces_non_default_options_from_the_header(tmp_path, capsys):
    args = ["--image", "reg.example/budgetdiff-gpu:1.2", "--worker-cpus", "8", "--out-dir", str(tmp_path)]
    assert render.main(args) == 0
    header = (tmp_path / render.RAYSERVICE_FILE).read_text().splitlines()[0]
    assert "--image reg.example/budgetdiff-gpu:1.2" in header and "--worker-cpus 8" in header
    assert render.main(["--check", *args]) == 0
    assert render.main(["--check", "--out-dir", str(tmp_path)]) == 1  # defaults render something else


def test_the_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    cases = [
        (["--config", str(REPO / "serving" / "configs" / "cpu.yaml")], "num_gpus is 0"),
        (["--model-source", "s3://bucket/bundle"], "--model-source"),
        (["--model-source", "models:/"], "names no model"),
        (["--worker-cpus", "1"], "--worker-cpus"),
        (["--config", str(tmp_path / "nope.yaml")], "does not exist"),
    ]
    for args, message in cases:
        assert render.main([*args, "--out-dir", str(tmp_path)]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, (args, err)
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_serve_config_that_serve_would_silently_accept_is_refused(tmp_path):
    cfg = yaml.safe_load(GPU_YAML.read_text())
    model = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "ImageModel")
    model["autoscaling_config"]["max_replica"] = model["autoscaling_config"].pop("max_replicas")
    bad = tmp_path / "gpu.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"autoscaling_config\.max_replica: unknown key \(did you mean max_replicas"):
        render.render(RenderOptions(config=bad))


# ----------------------------------------------------------------------------------------------
# The KubeRay CRD schema and the keys it does not close
# ----------------------------------------------------------------------------------------------
def test_rayservice_validates_against_the_kuberay_crd_schema(rayservice):
    schema = checks.load_schema()
    spec = schema["properties"]["spec"]["properties"]
    assert {"serveConfigV2", "rayClusterConfig"} <= set(spec)  # the RayService CRD, not some other schema
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    assert checks.schema_errors(rayservice) == []


def test_the_schema_check_is_live(rayservice):
    bad = copy.deepcopy(rayservice)
    _worker(bad)["minReplicas"] = "one"
    _containers(bad)["worker"]["resources"]["limits"]["memory"] = "16 gigs"
    errors = checks.schema_errors(bad)
    assert any("minReplicas" in e for e in errors) and any("memory" in e for e in errors)


def test_committed_rayservice_passes_every_check(rayservice):
    assert checks.unknown_keys(rayservice, checks.load_schema()) == []
    assert checks.ray_start_param_errors(rayservice) == []
    assert checks.serve_config_errors(rayservice) == []
    assert checks.rayservice_errors(rayservice) == []


@pytest.mark.parametrize("edit, path, hint", [
    (lambda m: _worker(m).__setitem__("minReplica", _worker(m)["minReplicas"]),
     "spec.rayClusterConfig.workerGroupSpecs[0].minReplica", "minReplicas"),
    (lambda m: _worker(m).__setitem__("replica", _worker(m).pop("replicas")),
     "spec.rayClusterConfig.workerGroupSpecs[0].replica", "replicas"),
    (lambda m: _cluster(m).__setitem__("enableInTreeAutoscaler", _cluster(m).pop("enableInTreeAutoscaling")),
     "spec.rayClusterConfig.enableInTreeAutoscaler", "enableInTreeAutoscaling"),
    (lambda m: _cluster(m)["autoscalerOptions"].__setitem__("idleTimeoutSecond", 60),
     "spec.rayClusterConfig.autoscalerOptions.idleTimeoutSecond", "idleTimeoutSeconds"),
    (lambda m: _containers(m)["worker"].__setitem__("resource", _containers(m)["worker"].pop("resources")),
     "spec.rayClusterConfig.workerGroupSpecs[0].template.spec.containers[0].resource", "resources"),
    (lambda m: _worker(m)["template"]["spec"]["tolerations"][0].__setitem__("efect", "NoSchedule"),
     "spec.rayClusterConfig.workerGroupSpecs[0].template.spec.tolerations[0].efect", "effect"),
    (lambda m: m["metadata"].__setitem__("label", {"a": "b"}), "metadata.label", "labels"),
    (lambda m: m["spec"].__setitem__("serveConfigv2", m["spec"]["serveConfigV2"]), "spec.serveConfigv2",
     "serveConfigV2"),
])
def test_misspelled_keys_are_caught_though_the_schema_allows_them(rayservice, edit, path, hint):
    bad = copy.deepcopy(rayservice)
    edit(bad)
    errors = checks.unknown_keys(bad, checks.load_schema())
    assert errors == [f"{path}: unknown key (did you mean {hint}?)"]
    with pytest.raises(ValueError, match=re.escape(path)):
        render.check_manifests(bad, render.build_podmonitor(RenderOptions()))


def test_schema_alone_misses_a_misspelled_key(rayservice):
    """Why the walk exists: the CRD schema has no additionalProperties: false."""
    bad = copy.deepcopy(rayservice)
    _worker(bad)["minReplica"] = 3
    assert checks.schema_errors(bad) == []
    assert checks.unknown_keys(bad, checks.load_schema())


def test_ray_start_params_are_ray_start_options(rayservice):
    bad = copy.deepcopy(rayservice)
    _cluster(bad)["headGroupSpec"]["rayStartParams"]["metrics-export-prot"] = "8080"
    errors = checks.ray_start_param_errors(bad)
    assert len(errors) == 1 and "headGroupSpec.rayStartParams.metrics-export-prot" in errors[0]
    assert "did you mean metrics-export-port" in errors[0]


# ----------------------------------------------------------------------------------------------
# serveConfigV2: gpu.yaml adapted, valid for Serve and for us
# ----------------------------------------------------------------------------------------------
def _deployment(cfg: dict, name: str) -> dict:
    return next(d for d in cfg["applications"][0]["deployments"] if d["name"] == name)


def test_serve_config_v2_is_gpu_yaml_with_only_the_cluster_host(rayservice):
    from ray.serve.schema import ServeDeploySchema

    from serving.config import validate_serve_config

    cfg = checks.serve_config_of(rayservice)
    ServeDeploySchema(**cfg)  # Ray Serve's own (shallow) schema
    validate_serve_config(copy.deepcopy(cfg))  # ours: every nested key
    source = yaml.safe_load(GPU_YAML.read_text())
    expected = copy.deepcopy(source)
    expected["http_options"]["host"] = "0.0.0.0"  # the one adaptation of the default render
    assert cfg == expected
    assert cfg["applications"][0]["deployments"] == source["applications"][0]["deployments"]


def test_serve_config_v2_errors_are_reported(rayservice):
    bad = copy.deepcopy(rayservice)
    bad["spec"]["serveConfigV2"] = bad["spec"]["serveConfigV2"].replace("target_ongoing_requests",
                                                                          "target_ongoing_request", 1)
    errors = checks.serve_config_errors(bad)
    assert len(errors) == 1 and "target_ongoing_request: unknown key" in errors[0]
    bad["spec"]["serveConfigV2"] = "applications: [unclosed"
    assert "not valid YAML" in checks.serve_config_errors(bad)[0]


def test_registry_model_source_fetches_into_the_pods_and_points_serve_there():
    opts = RenderOptions(model_source="models:/budgetdiff@champion")
    manifest, monitor = render.build_rayservice(opts), render.build_podmonitor(opts)
    render.check_manifests(manifest, monitor)
    cfg = checks.serve_config_of(manifest)
    for name in ("ImageModel", "ShadowEvaluator"):
        if any(d["name"] == name for d in cfg["applications"][0]["deployments"]):
            assert _deployment(cfg, name)["user_config"]["model_source"] == render.BUNDLE_DIR
    # everything else is gpu.yaml's
    source = yaml.safe_load(GPU_YAML.read_text())
    for dep in cfg["applications"][0]["deployments"]:
        orig = copy.deepcopy(_deployment(source, dep["name"]))
        if "model_source" in dep.get("user_config", {}) and dep["user_config"]["model_source"] == render.BUNDLE_DIR:
            orig["user_config"]["model_source"] = render.BUNDLE_DIR
        assert dep == orig

    spec = _worker(manifest)["template"]["spec"]
    (init,) = spec["initContainers"]
    env = _env(init)
    assert init["command"] == [render.ENTRYPOINT] and init["image"] == opts.image
    assert env["BUDGETDIFF_MODEL_SOURCE"]["value"] == "models:/budgetdiff@champion"
    assert env["BUDGETDIFF_BUNDLE_DIR"]["value"] == render.BUNDLE_DIR
    assert "optional" not in env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]  # required now
    volume = spec["volumes"][0]["name"]
    mounts = [m for c in (init, spec["containers"][0]) for m in c["volumeMounts"]]
    assert all(m["name"] == volume and render.BUNDLE_DIR.startswith(m["mountPath"] + "/") for m in mounts)
    assert len(mounts) == 2
    assert "initContainers" not in _worker(render.build_rayservice(RenderOptions()))["template"]["spec"]


def test_an_alias_with_registry_poll_s_is_followed_in_place(tmp_path):
    """Way 2 on Kubernetes: the replicas keep the alias and poll it (no init container), as the
    local profile does; the tracking URI is required; the header says what is served."""
    opts = RenderOptions(model_source="models:/budgetdiff@champion", registry_poll_s=60)
    manifest, monitor = render.build_rayservice(opts), render.build_podmonitor(opts)
    render.check_manifests(manifest, monitor)
    cfg = checks.serve_config_of(manifest)
    model = _deployment(cfg, "ImageModel")["user_config"]
    assert model["model_source"] == "models:/budgetdiff@champion" and model["registry_poll_s"] == 60
    assert _deployment(cfg, "ShadowEvaluator")["user_config"]["model_source"] == "models:/budgetdiff@champion"
    spec = _worker(manifest)["template"]["spec"]
    assert "initContainers" not in spec and "volumes" not in spec
    env = _env(spec["containers"][0])
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["optional"] is False
    texts = render.render(opts)
    assert "# Serves: models:/budgetdiff@champion, followed in place" in texts[render.RAYSERVICE_FILE]
    assert "--registry-poll-s 60" in texts[render.RAYSERVICE_FILE].splitlines()[0]
    # the serve config's own alias + registry_poll_s is followed too, without render options
    source = yaml.safe_load(GPU_YAML.read_text())
    _deployment(source, "ImageModel")["user_config"].update(model_source="models:/budgetdiff@champion",
                                                             registry_poll_s=30)
    config = tmp_path / "gpu-follow.yaml"
    config.write_text(yaml.safe_dump(source))
    follow = render.cluster_serve_config(config)
    assert follow.follows == "models:/budgetdiff@champion" and follow.registry_source is None
    # a pinned version cannot be followed; an alias without polling is fetched at pod start (way 1)
    with pytest.raises(ValueError, match="--registry-poll-s: follows a registry alias"):
        render.cluster_serve_config(GPU_YAML, "models:/budgetdiff/7", 60)
    pinned = render.cluster_serve_config(GPU_YAML, "models:/budgetdiff@champion", 0)
    assert pinned.registry_source == "models:/budgetdiff@champion" and pinned.follows is None


def test_the_manifest_says_which_bundle_is_served(texts):
    header = texts[render.RAYSERVICE_FILE].splitlines()[2]
    assert header.startswith("# Serves: models/bundle in the image (the bundle dvc repro built")
    pinned = render.render(RenderOptions(model_source="models:/budgetdiff/7"))[render.RAYSERVICE_FILE]
    assert f"# Serves: models:/budgetdiff/7, fetched into {render.BUNDLE_DIR}" in pinned


def test_a_local_model_source_is_used_as_it_is():
    manifest = render.build_rayservice(RenderOptions(model_source="/models/sd15-bundle"))
    cfg = checks.serve_config_of(manifest)
    assert _deployment(cfg, "ImageModel")["user_config"]["model_source"] == "/models/sd15-bundle"
    assert "initContainers" not in _worker(manifest)["template"]["spec"]


# ----------------------------------------------------------------------------------------------
# The cluster: CPU head, autoscaling GPU workers sized from the serve config
# ----------------------------------------------------------------------------------------------
def test_gpu_worker_group_autoscales_and_holds_the_replicas(rayservice):
    cluster = _cluster(rayservice)
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["resources"]["limits"]
    worker = _worker(rayservice)
    assert worker["groupName"] and 1 <= worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
    res = _containers(rayservice)["worker"]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 and res["requests"] == res["limits"]
    head = _containers(rayservice)["head"]
    assert "nvidia.com/gpu" not in head["resources"]["limits"] and head["resources"]["requests"] == head["resources"]["limits"]

    cfg = yaml.safe_load(GPU_YAML.read_text())
    deps = cfg["applications"][0]["deployments"]
    model = _deployment(cfg, "ImageModel")
    gpus_at_max = sum((d.get("autoscaling_config") or {}).get("max_replicas", d.get("num_replicas", 1))
                      * (d.get("ray_actor_options") or {}).get("num_gpus", 0) for d in deps)
    assert worker["maxReplicas"] >= gpus_at_max  # one GPU per worker pod
    assert worker["minReplicas"] >= model["autoscaling_config"]["min_replicas"] * model["ray_actor_options"]["num_gpus"]
    cpus_at_max = sum((d.get("autoscaling_config") or {}).get("max_replicas", d.get("num_replicas", 1))
                      * (d.get("ray_actor_options") or {}).get("num_cpus", 1) for d in deps)
    assert worker["maxReplicas"] * int(res["limits"]["cpu"]) >= cpus_at_max


def test_worker_bounds_pack_gpu_and_cpu_replicas():
    def serve(*deps):
        return render.ClusterServeConfig({}, None, 8000, "K", tuple(render.Replicas(*d) for d in deps))

    model = ("ImageModel", 1, 4, 2, 1)
    assert render.worker_group_bounds(serve(model, ("ImageIngress", 1, 4, 1, 0)), 4) == (1, 4)
    assert render.worker_group_bounds(serve(model, ("ImageIngress", 1, 4, 1, 0), ("Shadow", 1, 1, 1, 0.5)), 4) == (2, 5)
    assert render.worker_group_bounds(serve(("ImageModel", 2, 6, 1, 0.5)), 4) == (1, 3)  # two per GPU
    assert render.worker_group_bounds(serve(model, ("ImageIngress", 4, 4, 2, 0)), 4) == (3, 4)  # CPU-bound
    with pytest.raises(ValueError, match="--worker-cpus: 1 < ImageModel's num_cpus 2"):
        render.worker_group_bounds(serve(model), 1)


def test_head_takes_no_replicas_and_exposes_dashboard_serve_and_metrics(rayservice):
    head = _cluster(rayservice)["headGroupSpec"]
    params = head["rayStartParams"]
    assert params["num-cpus"] == "0" and params["dashboard-host"] == "0.0.0.0"
    http_port = yaml.safe_load(GPU_YAML.read_text())["http_options"]["port"]
    for node, container in _containers(rayservice).items():
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == render.METRICS_PORT and ports["serve"] == http_port, node
        group = head if node == "head" else _worker(rayservice)
        assert group["rayStartParams"]["metrics-export-port"] == str(ports["metrics"])
    ports = {p["name"]: p["containerPort"] for p in _containers(rayservice)["head"]["ports"]}
    assert ports["dashboard"] == 8265
    assert checks.serve_config_of(rayservice)["http_options"]["host"] == "0.0.0.0"


def test_environment_latency_buckets_and_secrets(rayservice):
    from ray.serve._private.constants_utils import parse_latency_buckets

    from monitoring.names import LATENCY_MS_BUCKETS
    from serving.config import IngressOptions

    api_key_env = IngressOptions.from_dict(
        _deployment(checks.serve_config_of(rayservice), "ImageIngress").get("user_config")).api_key_env
    for node, container in _containers(rayservice).items():
        env = _env(container)
        buckets = parse_latency_buckets(env["RAY_SERVE_REQUEST_LATENCY_BUCKETS_MS"]["value"], [])
        assert buckets == [float(b) for b in LATENCY_MS_BUCKETS], node
        assert buckets[-1] >= 120_000  # diffusion scale, unlike Serve's default 2 s -> 5 s -> 10 s jumps
        ref = env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]
        assert ref["name"] == render.CONFIGMAP and ref["key"] == render.CONFIGMAP_MLFLOW_KEY
        secret = env[api_key_env]["valueFrom"]["secretKeyRef"]
        assert secret == {"name": render.SECRET, "key": render.SECRET_API_KEY}  # required: no open API by accident
        assert "value" not in env[api_key_env]


def test_ray_version_and_image_match_the_lock(rayservice):
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    ray = next(p["version"] for p in lock["package"] if p["name"] == "ray")
    assert _cluster(rayservice)["rayVersion"] == ray
    images = {c["image"] for c in _containers(rayservice).values()}
    assert images == {RenderOptions().image}


# ----------------------------------------------------------------------------------------------
# PodMonitor
# ----------------------------------------------------------------------------------------------
def kuberay_pod_labels(template_labels: dict, node_type: str, cluster: str, group: str) -> dict:
    """The labels KubeRay v1.x puts on a Ray pod (ray-operator/controllers/ray/common/pod.go
    ``labelPod``): the template's own labels win; KubeRay adds the ones the template lacks."""
    ours = {"ray.io/is-ray-node": "yes", "ray.io/cluster": cluster, "ray.io/node-type": node_type,
            "ray.io/group": group, "ray.io/identifier": f"{cluster}-{node_type}",
            "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    return {**ours, **template_labels}


def test_podmonitor_selects_the_rayservice_pods_on_the_metrics_port(rayservice, podmonitor):
    assert checks.unknown_podmonitor_keys(podmonitor) == []
    selector = podmonitor["spec"]["selector"]
    cluster = f"{rayservice['metadata']['name']}-x7k2p"  # RayService names its RayCluster NAME-<suffix>
    head_tpl = _cluster(rayservice)["headGroupSpec"]["template"]
    worker = _worker(rayservice)
    head_labels = kuberay_pod_labels(head_tpl["metadata"]["labels"], "head", cluster, "headgroup")
    worker_labels = kuberay_pod_labels(worker["template"]["metadata"]["labels"], "worker", cluster, worker["groupName"])
    assert checks.selector_matches(selector, head_labels)
    assert checks.selector_matches(selector, worker_labels)
    # not another RayService's pods, not a pod without our labels, not a non-Ray pod of ours
    other = {**worker_labels, "app.kubernetes.io/instance": "someone-else"}
    assert not checks.selector_matches(selector, other)
    assert not checks.selector_matches(selector, kuberay_pod_labels({}, "worker", cluster, "gpu-workers"))
    assert not checks.selector_matches(selector, {k: v for k, v in worker_labels.items() if k != "ray.io/node-type"})

    (endpoint,) = podmonitor["spec"]["podMetricsEndpoints"]
    for node, container in _containers(rayservice).items():
        assert endpoint["port"] in {p["name"] for p in container["ports"]}, node


def test_podmonitor_misspelled_key_is_caught(podmonitor):
    bad = copy.deepcopy(podmonitor)
    bad["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    bad["spec"]["selector"]["matchLabel"] = {}
    errors = checks.unknown_podmonitor_keys(bad)
    assert "spec.selector.matchLabel: unknown key (did you mean matchLabels?)" in errors
    assert "spec.podMetricsEndpoints[0].intervall: unknown key (did you mean interval?)" in errors


def test_selector_expressions():
    sel = {"matchLabels": {"a": "1"}, "matchExpressions": [
        {"key": "b", "operator": "In", "values": ["x", "y"]}, {"key": "c", "operator": "DoesNotExist"},
        {"key": "d", "operator": "NotIn", "values": ["z"]}, {"key": "e", "operator": "Exists"}]}
    assert checks.selector_matches(sel, {"a": "1", "b": "y", "e": ""})
    assert not checks.selector_matches(sel, {"a": "1", "b": "q", "e": ""})
    assert not checks.selector_matches(sel, {"a": "1", "b": "x", "c": "", "e": ""})
    assert not checks.selector_matches(sel, {"a": "1", "b": "x", "d": "z", "e": ""})
    assert not checks.selector_matches(sel, {"a": "1", "b": "x"})


# ----------------------------------------------------------------------------------------------
# The image: Dockerfile text, its .dockerignore, the entrypoint
# ----------------------------------------------------------------------------------------------
def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_dockerfile_essentials():
    steps = _instructions(DOCKER / "Dockerfile")
    (base,) = [a for i, a in steps if i == "FROM"]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-(?:cudnn-)?runtime-ubuntu\d+\.\d+", base)
    assert m, f"FROM {base}: not a CUDA runtime image"
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    cuda = next(p["version"] for p in lock["package"] if p["name"] == "nvidia-cuda-runtime")
    assert m.group(1) == cuda.split(".")[0], "the base image's CUDA major must match torch's CUDA wheels"

    copies = [a for i, a in steps if i == "COPY"]
    runs = [a for i, a in steps if i == "RUN"]
    lock_copy = next(k for k, (i, a) in enumerate(steps) if i == "COPY" and a.split() == ["pyproject.toml", "uv.lock", "./"])
    deps_sync = next(k for k, (i, a) in enumerate(steps) if i == "RUN" and "uv sync --frozen --no-dev --no-install-project" in a)
    code_copy = next(k for k, (i, a) in enumerate(steps) if i == "COPY" and a.split() == [".", "."])
    assert lock_copy < deps_sync < code_copy, "the lock is copied and synced before the code (layer caching)"
    assert any(re.search(r"uv sync --frozen --no-dev(?! --no-install-project)", r) for r in runs[1:])
    assert any(a.startswith("--from=ghcr.io/astral-sh/uv:") for a in copies)
    assert any("wget" in r for r in runs), "KubeRay's default probes need wget in the Ray container"
    assert ("WORKDIR", render.APP_DIR) in steps
    entry = next(json.loads(a) for i, a in steps if i == "ENTRYPOINT")
    assert entry == [render.ENTRYPOINT] == [f"{render.APP_DIR}/{ENTRYPOINT.relative_to(REPO)}"]
    assert any("/opt/venv/bin" in a for i, a in steps if i == "ENV")


def _excluded(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent of it decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_build_and_the_service_need():
    patterns = [ln.strip() for ln in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = ["pyproject.toml", "uv.lock", project["project"]["readme"], "infra/docker/entrypoint.sh",
              "registry/resolve.py", "registry/__main__.py", "monitoring/names.py", "registry/artifacts.py", "serving/app.py"]
    needed += project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    # the bundle the serve config names and every model directory it references
    cfg = yaml.safe_load(GPU_YAML.read_text())
    bundle = _deployment(cfg, "ImageModel")["user_config"]["model_source"]
    needed.append(bundle)
    raw = json.loads((REPO / bundle / "bundle.json").read_text())
    for part in ("base", "student", "budget"):
        if raw.get(part):
            needed.append(os.path.normpath(f"{bundle}/{raw[part]['path']}"))
    for dep in cfg["applications"][0]["deployments"]:
        for key in ("clip_dir", "attributes_dir"):
            if key in (dep.get("user_config") or {}):
                needed.append(dep["user_config"][key])
    missing = [p for p in needed if _excluded(p, patterns)]
    assert not missing, f"infra/docker/Dockerfile.dockerignore leaves out {missing}"
    for path in (".venv/bin/python", "mlflow.db", "models/base_pretrain/unet/x", ".git/HEAD", "data/x"):
        assert _excluded(path, patterns), path


def _run_entrypoint(args: list[str], **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("BUDGETDIFF_", "MLFLOW_"))}
    full.update(BUDGETDIFF_PYTHON=sys.executable, OMP_NUM_THREADS="1", **env)
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=full, capture_output=True, text=True, timeout=300)


def test_entrypoint_without_a_registry_source_just_execs():
    assert os.access(ENTRYPOINT, os.X_OK)
    assert subprocess.run(["bash", "-n", str(ENTRYPOINT)]).returncode == 0
    r = _run_entrypoint(["echo", "ray start"])
    assert r.returncode == 0 and r.stdout == "ray start\n" and r.stderr == ""
    r = _run_entrypoint(["echo", "ok"], BUDGETDIFF_MODEL_SOURCE="models/bundle")
    assert r.returncode == 0 and r.stdout == "ok\n" and "nothing to fetch" in r.stderr
    r = _run_entrypoint([])  # the init container with nothing to do
    assert r.returncode == 0 and r.stdout == ""


def test_entrypoint_refuses_a_registry_source_without_its_settings(tmp_path):
    r = _run_entrypoint(["echo", "never"], BUDGETDIFF_MODEL_SOURCE="models:/budgetdiff@champion")
    assert r.returncode == 2 and "never" not in r.stdout and "BUDGETDIFF_BUNDLE_DIR" in r.stderr
    r = _run_entrypoint(["echo", "never"], BUDGETDIFF_MODEL_SOURCE="models:/budgetdiff@champion",
                        BUDGETDIFF_BUNDLE_DIR=str(tmp_path / "b"))
    assert r.returncode == 2 and "never" not in r.stdout and "MLFLOW_TRACKING_URI" in r.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------
# Fetching a registered version (what the init container runs: python -m registry fetch)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("uri, parsed", [
    ("models:/budgetdiff@champion", ("budgetdiff", "champion", None)),
    ("models:/budgetdiff/7", ("budgetdiff", None, "7")),
])
def test_parse_registry_uri(uri, parsed):
    from registry.resolve import parse_uri

    assert parse_uri(uri) == parsed


@pytest.mark.parametrize("uri", ["models:/", "models:/budgetdiff", "models:/budgetdiff/latest", "runs:/x/y",
                                 "models:/a/b/c", "models:/@champion"])
def test_parse_registry_uri_rejects(uri):
    from registry import RegistryError
    from registry.resolve import parse_uri

    with pytest.raises(RegistryError, match="^model_source: .* is not models:/NAME@ALIAS or models:/NAME/VERSION"):
        parse_uri(uri)


@contextmanager
def registry_env(reg: dict):
    """MLFLOW_TRACKING_URI on ``reg`` while inside; mlflow's global URIs restored after."""
    import mlflow

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", reg["uri"])
            mp.setenv("BUDGETDIFF_REGISTRY_CACHE", str(reg["root"] / "cache"))
            yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


@pytest.fixture(scope="module")
def tiny_registry(tiny_bundle_dir, tmp_path_factory):
    """A temporary sqlite registry holding the tiny bundle as version 1 with alias champion."""
    from registry.server import create_database
    from registry.store import connect, register

    root = tmp_path_factory.mktemp("infra_registry")
    out = {"uri": create_database(root / "mlflow.db", root / "mlartifacts"), "root": root}
    with registry_env(out):
        client = connect()
        with warnings.catch_warnings():  # mlflow's "add type hints to predict" advice when logging
            warnings.simplefilter("ignore", UserWarning)
            reg = register(str(tiny_bundle_dir), [], client)
        client.set_registered_model_alias("budgetdiff", "champion", reg["version"])
    return {**out, "version": reg["version"], "sha": reg["bundle_sha256"]}


def test_entrypoint_fetches_the_champion_into_a_loadable_bundle(tiny_registry, tmp_path, capsys):
    from budgetdiff.generation.bundle import load_bundle
    from budgetdiff.generation.engine import GenerationRequest, Generator

    out = tmp_path / "data" / "bundle"
    env = {"BUDGETDIFF_MODEL_SOURCE": "models:/budgetdiff@champion", "BUDGETDIFF_BUNDLE_DIR": str(out),
           "MLFLOW_TRACKING_URI": tiny_registry["uri"], "BUDGETDIFF_REGISTRY_CACHE": str(tmp_path / "cache")}
    r = _run_entrypoint(["echo", "ray start"], **env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    result = json.loads(lines[-2])
    assert lines[-1] == "ray start"  # then it exec'd the command
    assert result["fetched"] is True and result["version"] == tiny_registry["version"]
    assert result["bundle_sha256"] == tiny_registry["sha"] and result["bundle_dir"] == str(out)
    # a self-contained directory: the text encoder the version references by hash is a real copy
    encoder = out / "base" / "text_encoder"
    assert encoder.is_dir() and not encoder.is_symlink() and any(encoder.iterdir())
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle"]  # no temporary leftovers
    load_bundle(out)
    gen = Generator.load(out, device="cpu")
    (res,) = gen([GenerationRequest("a red circle", mode="full", steps=2, seed=0)], batch_size=1)
    assert res.image is not None

    # a restarted init container finds the same version in place and fetches nothing
    from registry.cli import main

    with registry_env(tiny_registry):
        assert main(["fetch", "models:/budgetdiff/" + tiny_registry["version"], "--out", str(out)]) == 0
    captured = capsys.readouterr()
    again = json.loads(captured.out.strip().splitlines()[-1])
    assert again["fetched"] is False and again["version"] == tiny_registry["version"]
    assert again["bundle_sha256"] == tiny_registry["sha"] and "already in place" in captured.err
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle"]


def test_fetch_failures_are_one_line(tiny_registry, tmp_path, capsys):
    from registry.cli import main

    out = tmp_path / "bundle"
    with registry_env(tiny_registry):
        for source, message in [("models:/budgetdiff@nosuchalias", "error: model_source: models:/budgetdiff@nosuchalias"
                                                                     ": no such alias"),
                                ("models:/budgetdiff/99", "error: model_source: models:/budgetdiff/99: no such version"),
                                ("models:/nosuchmodel@champion", "error: model_source: models:/nosuchmodel@champion"
                                                                  ": no such alias"),
                                ("models:/budgetdiff", "error: model_source: 'models:/budgetdiff' is not "
                                                       "models:/NAME@ALIAS")]:
            assert main(["fetch", source, "--out", str(out)]) == 2
            captured = capsys.readouterr()
            err = captured.err.strip()
            assert len(err.splitlines()) == 1 and err.startswith(message), err
            assert captured.out == ""
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, message", [("corrupt", "does not match its sha256 in the version's manifest"),
                                             ("delete", "is missing from the fetched bundle")])
def test_fetch_refuses_a_bundle_that_fails_verification(tiny_registry, tmp_path, capsys, monkeypatch, damage, message):
    """A downloaded file that does not match the version's manifest: exit 2, one line; the
    directory already there is left as it was and nothing temporary stays behind."""
    import mlflow

    from registry.cli import main

    out = tmp_path / "data" / "bundle"
    out.mkdir(parents=True)
    (out / "previous.txt").write_text("the bundle that was there\n")
    real = mlflow.artifacts.download_artifacts

    def damaged_download(*args, **kwargs):
        local = Path(real(*args, **kwargs))
        if not str(kwargs.get("artifact_uri", "")).startswith("models:/"):
            return str(local)  # the referenced text encoder, fetched into the cache
        assert str(out.parent) in str(local)  # a copy in the fetch's work directory, never the store's own
        target = next(local.rglob("skip_policy.json"))
        if damage == "corrupt":
            target.write_text(target.read_text() + " ")
        else:
            target.unlink()
        return str(local)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", damaged_download)
    with registry_env(tiny_registry):
        assert main(["fetch", "models:/budgetdiff@champion", "--out", str(out), "--cache", str(tmp_path / "cache")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: model_source: models:/budgetdiff@champion: "), err
    assert message in err and "skip_policy.json" in err and captured.out == ""
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle"]
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]
