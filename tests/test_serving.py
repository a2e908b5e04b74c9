"""The serving layer without Ray: API contract, errors, auth, batching, model swaps, configs.

The ingress app runs in-process over ``LocalImageModel`` on the tiny bundle (FastAPI TestClient);
``tests/test_serving_e2e.py`` runs the same app on a real Serve cluster.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from serving.api import APIError, HandleBackend, IngressState, LocalBackend, create_api  # noqa: E402
from serving.config import (  # noqa: E402
    CONFIG_DIR, IngressOptions, ModelOptions, load_serve_config, validate_serve_config, with_overrides)
from serving.model import ImageJob, LocalImageModel, load_served_model, run_jobs  # noqa: E402

URL = "/v1/images/generations"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread, as a 1-CPU replica runs: on a busy 2-core machine two spinning OpenMP
    threads make the tiny UNet tens of times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(bundle_dir, **extra) -> LocalImageModel:
    model = LocalImageModel()
    asyncio.run(model.reconfigure({"model_source": str(bundle_dir), "warmup": False, **extra}))
    return model


@pytest.fixture(scope="module")
def local_model(tiny_bundle_dir):
    return _model(tiny_bundle_dir)


@pytest.fixture()
def client(local_model):
    return TestClient(create_api(IngressState(LocalBackend(local_model))))


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


# ------------------------------------------------------------------------------------------
# The API contract
# ------------------------------------------------------------------------------------------
def test_generation_reply_is_openai_shaped_with_records(client):
    r = client.post(URL, json={"prompt": "a small red circle at the top left", "n": 2, "seed": 5,
                               "mode": "full", "steps": 3, "size": "16x16", "response_format": "b64_json",
                               "model": "budgetdiff"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    assert body["model_version"].startswith("bd-") and r.headers["x-model-version"] == body["model_version"]
    for i, item in enumerate(body["data"]):
        assert _pixels(item["b64_json"]).shape == (16, 16, 3)
        rec = item["record"]
        assert (rec["mode"], rec["steps"], rec["nfe"], rec["skipped"], rec["seed"]) == ("full", 3, 3, 0, 5 + i)
        assert rec["model_version"] == body["model_version"] and rec["latency_ms"] > 0
    assert body["usage"]["images"] == 2 and body["usage"]["nfe"] == 6


def test_request_ids_are_echoed_only_when_safe(client):
    body = {"prompt": "a red circle", "mode": "full", "steps": 2}
    r = client.post(URL, json=body, headers={"x-request-id": "job-42.a"})
    assert r.json()["id"] == "job-42.a" and r.headers["x-request-id"] == "job-42.a"
    assert r.json()["data"][0]["record"]["request_id"] == "job-42.a/0"
    r = client.post(URL, json=body, headers={"x-request-id": "<script>" + "x" * 100})
    assert r.status_code == 200 and "<" not in r.json()["id"]


def test_auto_mode_is_the_default_and_records_its_route(client):
    body = client.post(URL, json={"prompt": "a blue square", "seed": 1, "quality_target": 0.9}).json()
    rec = body["data"][0]["record"]
    assert rec["mode"] == "auto" and rec["route"] in ("student", "base+skip")
    assert rec["budget"]["chosen_steps"] >= 1 and rec["quality_target"] == 0.9


def test_openai_client_round_trip(client):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=client, max_retries=0)
    reply = api.images.generate(prompt="a green triangle", n=1, size="16x16", response_format="b64_json",
                                model="budgetdiff", extra_body={"mode": "student", "seed": 2})
    assert _pixels(reply.data[0].b64_json).shape == (16, 16, 3)
    with pytest.raises(openai.BadRequestError) as err:
        api.images.generate(prompt="a green triangle", size="1024x1024")
    assert "16x16" in err.value.body["message"] and err.value.body["param"] == "size"


def test_models_healthz_and_playground(client):
    models = client.get("/v1/models").json()
    card = models["data"][0]
    assert card["id"] == "budgetdiff" and card["sizes"] == ["16x16"] and "auto" in card["modes"]
    assert client.get("/v1/models/budgetdiff").json()["version"]["id"] == card["version"]["id"]
    assert client.get("/v1/models/dall-e-3").status_code == 404
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model_version"] == card["version"]["id"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="result-image"' in page.text


# A bad-input table: (body or raw bytes, status, param, start of message)
BAD_INPUTS = [
    ({}, 400, "prompt", "prompt: is required"),
    ({"prompt": ""}, 400, "prompt", "prompt: must be a non-empty string"),
    ({"prompt": "   "}, 400, "prompt", "prompt: must be a non-empty string"),
    ({"prompt": 42}, 400, "prompt", "prompt: must be a string"),
    ({"prompt": ["a"]}, 400, "prompt", "prompt: must be a string"),
    ({"prompt": "x" * 1001}, 400, "prompt", "prompt: is 1001 characters"),
    ({"prompt": "a", "n": 0}, 400, "n", "n: must be an integer in 1..10"),
    ({"prompt": "a", "n": 11}, 400, "n", "n: must be an integer in 1..10"),
    ({"prompt": "a", "n": "2"}, 400, "n", "n: must be an integer"),
    ({"prompt": "a", "n": 1.5}, 400, "n", "n: must be an integer"),
    ({"prompt": "a", "size": "1024x1024"}, 400, "size", "size: 1024x1024 is not supported; this model generates 16x16"),
    ({"prompt": "a", "size": "big"}, 400, "size", "size: must be WIDTHxHEIGHT"),
    ({"prompt": "a", "response_format": "url"}, 400, "response_format", "response_format: url is not served"),
    ({"prompt": "a", "mode": "turbo"}, 400, "mode", "mode: unknown mode 'turbo'"),
    ({"prompt": "a", "mode": "full", "scheduler": "lms"}, 400, "scheduler", "scheduler: unknown scheduler"),
    ({"prompt": "a", "mode": "full", "steps": -3}, 400, "steps", "steps: must be an integer"),
    ({"prompt": "a", "mode": "full", "steps": "ten"}, 400, "steps", "steps: must be an integer"),
    ({"prompt": "a", "steps": 10}, 400, "steps", "steps: mode auto chooses its own step count"),
    ({"prompt": "a", "quality_target": 1.5}, 400, "quality_target", "quality_target: must be a number in (0, 1]"),
    ({"prompt": "a", "mode": "full", "quality_target": 0.9}, 400, "quality_target", "quality_target: mode full"),
    ({"prompt": "a", "guidance": -1}, 400, "guidance", "guidance: must be a finite number"),
    ({"prompt": "a", "guidance_scale": -1}, 400, "guidance", "guidance: must be a finite number"),  # diffusers' name
    (b'{"prompt": "a", "guidance_scale": NaN}', 400, "guidance", "guidance: must be a finite number"),
    ({"prompt": "a", "guidance": 2, "guidance_scale": 2}, 400, "guidance", "guidance: give guidance or guidance_scale"),
    ({"prompt": "a", "mode": "full", "seed": 2**63 - 1, "n": 2}, 400, "seed", "seed: seed + 1 is past"),
    ({"prompt": "a", "seed": -1}, 400, "seed", "seed: must be an integer"),
    ({"prompt": "a", "seed": True}, 400, "seed", "seed: must be an integer"),
    ({"prompt": "a", "colour": "red"}, 400, "colour", "colour: unrecognized request argument"),
    ({"prompt": "a", "stream": True}, 400, "stream", "stream: streaming is not supported"),
    ({"prompt": "a", "output_format": "jpeg"}, 400, "output_format", "output_format: only png"),
    ({"prompt": "a", "model": "dall-e-3"}, 404, "model", "model: the model 'dall-e-3' does not exist"),
    (b'{"prompt": "a",', 400, None, "body: is not valid JSON"),
    (b'["a prompt"]', 400, None, "body: must be a JSON object"),
    (b'', 400, None, "body: is empty"),
    (b'{"prompt": "\xff\xfe red"}', 400, None, "body: is not valid UTF-8"),
    (b'{"prompt": "' + b"a" * 70000 + b'"}', 413, None, "body: is 70014 bytes; the most is 65536"),
]


@pytest.mark.parametrize("body,status,param,message", BAD_INPUTS, ids=[f"bad{i}" for i in range(len(BAD_INPUTS))])
def test_bad_inputs_get_clear_openai_errors(client, body, status, param, message):
    if isinstance(body, bytes):
        r = client.post(URL, content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post(URL, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"].startswith(message), err
    assert err["type"] == "invalid_request_error"


def test_routes_and_methods_errors_are_openai_shaped(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = client.get(URL)
    assert r.status_code == 405 and "error" in r.json()


def test_model_specific_limits_are_422(tiny_components, tiny_bundle_dir, tmp_path):
    """A bundle without a student: modes student/auto are valid requests this model cannot serve."""
    raw = json.loads((tiny_bundle_dir / "bundle.json").read_text())
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, root)
    raw.pop("student"), raw.pop("auto")
    for part in ("base", "budget"):
        raw[part]["path"] = str((tiny_bundle_dir / raw[part]["path"]).resolve())
    (root / "bundle.json").write_text(json.dumps(raw))
    client = TestClient(create_api(IngressState(LocalBackend(_model(root)))))
    r = client.post(URL, json={"prompt": "a red circle", "mode": "student"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "mode"
    assert "student" in r.json()["error"]["message"]
    assert client.post(URL, json={"prompt": "a red circle", "mode": "full", "steps": 2}).status_code == 200


class _PicklingHandle:
    """A DeploymentHandle stand-in that sends every call across a process boundary the way Ray
    does (the arguments pickled and unpickled) to a ``LocalImageModel``."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, method):
        import pickle

        target = getattr(self.model, method)

        class _Method:
            def remote(self, *args):
                return target(*pickle.loads(pickle.dumps(args)))
        return _Method()


def test_one_http_request_is_validated_once_per_edge(local_model, monkeypatch):
    """HTTP -> ingress -> (pickled, as through Ray) -> model deployment -> engine: the request's
    own fields are validated once, at the ingress; the model deployment and the engine only check
    what the bundle supports, and the typed requests arrive as they were sent."""
    from budgetdiff.generation.engine import GenerationRequest, Generator

    validations, supported, received = [], [], []
    validate, check_supported, generate = (GenerationRequest.validate, Generator.check_supported,
                                           LocalImageModel.generate)
    monkeypatch.setattr(GenerationRequest, "validate", lambda self: validations.append(self) or validate(self))
    monkeypatch.setattr(Generator, "check_supported",
                        lambda self, r: supported.append(r) or check_supported(self, r))

    async def spy(self, requests, size=None):
        received.append(requests)
        return await generate(self, requests, size)

    monkeypatch.setattr(LocalImageModel, "generate", spy)
    client = TestClient(create_api(IngressState(HandleBackend(_PicklingHandle(local_model)))))
    r = client.post(URL, json={"prompt": "a small red circle at the top left", "n": 3, "mode": "full",
                               "steps": 2, "seed": 4, "guidance_scale": 1.5}, headers={"x-request-id": "q1"})
    assert r.status_code == 200, r.text
    assert len(validations) == 1  # the HTTP edge; not again per image, per layer or after pickling
    (requests,) = received
    assert all(type(q) is GenerationRequest for q in requests)
    assert [(q.seed, q.request_id, q.guidance) for q in requests] == [(4, "q1/0", 1.5), (5, "q1/1", 1.5),
                                                                     (6, "q1/2", 1.5)]
    assert [rec["record"]["guidance"] for rec in r.json()["data"]] == [1.5] * 3  # one name, API to record
    assert len(supported) == 6  # what the bundle supports: at the model deployment and in the engine
    assert len(validations) == 1


# ------------------------------------------------------------------------------------------
# Auth, timeouts, overload
# ------------------------------------------------------------------------------------------
def test_bearer_key_from_the_environment(client, monkeypatch):
    monkeypatch.setenv("BUDGETDIFF_API_KEY", "s3cret")
    body = {"prompt": "a red circle", "mode": "full", "steps": 2}
    r = client.post(URL, json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = client.post(URL, json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    assert client.post(URL, json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200


class _SlowModel:
    async def generate(self, requests, size=None):
        await asyncio.sleep(5)

    async def info(self):
        return {"version": {"id": "bd-x"}, "sizes": ["16x16"], "modes": ["auto"]}


def test_ingress_enforces_its_own_timeout():
    state = IngressState(LocalBackend(_SlowModel()), IngressOptions(request_timeout_s=0.2))
    client = TestClient(create_api(state))
    r = client.post(URL, json={"prompt": "a"}, headers={"x-request-timeout-seconds": "0"})  # cannot disable it
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


class _FakeResponse:
    def __init__(self, exc):
        self.exc = exc

    def __await__(self):
        async def fail():
            raise self.exc
        return fail().__await__()

    def cancel(self):
        pass


class _FakeHandle:
    """A DeploymentHandle whose calls raise ``exc`` (what a full queue or a dead replica does)."""

    def __init__(self, exc):
        self.exc = exc

    def __getattr__(self, method):
        handle = self

        class _Method:
            def remote(self, *args):
                return _FakeResponse(handle.exc)
        return _Method()


@pytest.mark.parametrize("status", [503, 429])
def test_backpressure_becomes_overload_with_retry_after(status):
    from ray.serve.exceptions import BackPressureError

    exc = BackPressureError(num_queued_requests=32, max_queued_requests=32)
    state = IngressState(HandleBackend(_FakeHandle(exc)), IngressOptions(overload_status=status, retry_after_s=3))
    client = TestClient(create_api(state))
    r = client.post(URL, json={"prompt": "a red circle"})
    assert r.status_code == status and r.headers["Retry-After"] == "3"
    assert r.json()["error"]["code"] in ("overloaded", "rate_limit_exceeded")
    assert client.get("/healthz").json()["status"] == "saturated"


def test_dead_replica_becomes_503_with_retry_after():
    import ray.exceptions

    state = IngressState(HandleBackend(_FakeHandle(ray.exceptions.ActorDiedError())))
    r = TestClient(create_api(state)).post(URL, json={"prompt": "a red circle"})
    assert r.status_code == 503 and r.headers["Retry-After"] == "2"
    assert r.json()["error"]["code"] == "replica_unavailable"


# ------------------------------------------------------------------------------------------
# Batching and model swaps
# ------------------------------------------------------------------------------------------
def test_batched_images_equal_single_request_images(local_model):
    from budgetdiff.generation.engine import GenerationRequest

    served = local_model._served
    requests = [GenerationRequest("a red circle", mode="full", steps=3, seed=1),
                GenerationRequest("two blue squares at the bottom", mode="full", steps=3, seed=2),
                GenerationRequest("a green star", mode="adaptive", steps=6, seed=3),
                GenerationRequest("a yellow triangle", mode="auto", seed=4),
                GenerationRequest("a red circle", mode="student", seed=5)]
    batched = run_jobs([ImageJob(served, r) for r in requests])
    assert max(b["record"]["batch_size"] for b in batched) >= 2  # compatible requests shared a call
    for request, together in zip(requests, batched):
        alone = run_jobs([ImageJob(served, request)])[0]
        assert alone["record"]["batch_size"] == 1
        diff = np.abs(_pixels(alone["b64_json"]).astype(int) - _pixels(together["b64_json"]).astype(int))
        assert diff.max() <= 1, (request, diff.max())  # same seed, same image, whatever the batch
        assert alone["record"]["nfe"] == together["record"]["nfe"]


def _bundle_with_other_policy(tiny_bundle_dir, tmp_path):
    from tests.conftest import tiny_skip_policy

    root = tmp_path / "bundle_b"
    shutil.copytree(tiny_bundle_dir, root)
    raw = json.loads((root / "bundle.json").read_text())
    for part in ("base", "student", "budget"):
        raw[part]["path"] = str((tiny_bundle_dir / raw[part]["path"]).resolve())
    (root / "bundle.json").write_text(json.dumps(raw))
    tiny_skip_policy(thresholds=(0.01, 0.3), default=0.3).save(root / "skip_policy.json")
    return root


def test_reconfigure_swaps_the_model_without_failing_requests(tiny_bundle_dir, tmp_path):
    other = _bundle_with_other_policy(tiny_bundle_dir, tmp_path)
    model = _model(tiny_bundle_dir)
    client = TestClient(create_api(IngressState(LocalBackend(model))))
    before = client.get("/healthz").json()["model_version"]
    from budgetdiff.generation.engine import GenerationRequest

    def call(seed):  # one API call of two images, as the ingress sends it
        first = GenerationRequest("a red circle", mode="adaptive", steps=8, seed=seed)
        return [first.for_image(i, f"r/{i}") for i in range(2)]

    async def traffic_during_swap():
        tasks = [asyncio.create_task(model.generate(call(i))) for i in range(6)]
        await asyncio.sleep(0)  # the first calls are checked against the old model
        swap = asyncio.create_task(model.reconfigure({"model_source": str(other), "warmup": False}))
        tasks += [asyncio.create_task(model.generate(call(10 + i))) for i in range(6)]
        await swap
        tasks += [asyncio.create_task(model.generate(call(20 + i))) for i in range(3)]
        return await asyncio.gather(*tasks)

    results = asyncio.run(traffic_during_swap())
    assert all("error" not in r for r in results)
    versions = [r["model_version"]["id"] for r in results]
    after = versions[-1]
    assert after != before and set(versions) <= {before, after} and versions[0] == before
    for r in results:  # one version per reply, and every image says so
        assert {img["record"]["model_version"] for img in r["images"]} == {r["model_version"]["id"]}
    assert model.swaps == 1 and client.get("/healthz").json()["model_version"] == after
    # a batch-size-only change keeps the loaded model
    asyncio.run(model.reconfigure({"model_source": str(other), "warmup": False, "max_batch_size": 2}))
    assert model.swaps == 1 and model._served.options.max_batch_size == 2


def test_skip_policy_override_changes_the_version(tiny_bundle_dir, tmp_path):
    from tests.conftest import tiny_skip_policy

    tiny_skip_policy(thresholds=(0.2,), default=0.2).save(tmp_path / "policy.json")
    base = load_served_model(ModelOptions(model_source=str(tiny_bundle_dir), warmup=False))
    over = load_served_model(ModelOptions(model_source=str(tiny_bundle_dir), warmup=False,
                                          skip_policy=str(tmp_path / "policy.json")))
    assert base.version["id"] != over.version["id"]
    assert base.version["unet_sha256"] == over.version["unet_sha256"]


def test_unknown_model_source_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="^model_source: bundle directory"):
        load_served_model(ModelOptions(model_source=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="^model_source: no resolver for s3:/"):
        load_served_model(ModelOptions(model_source="s3://bucket/bundle"))
    with pytest.raises(ValueError, match="^model_source: 'models:/x' is not models:/NAME@ALIAS"):
        load_served_model(ModelOptions(model_source="models:/x"))


# ------------------------------------------------------------------------------------------
# Config validation
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", ["cpu", "gpu", "bench"])
def test_shipped_profiles_are_valid(profile):
    from ray.serve.schema import ServeDeploySchema

    config = load_serve_config(CONFIG_DIR / f"{profile}.yaml")
    ServeDeploySchema(**config)
    assert config["http_options"]["host"] == "127.0.0.1"
    model = [d for d in config["applications"][0]["deployments"] if d["name"] == "ImageModel"][0]
    assert model["ray_actor_options"]["num_gpus"] == (1 if profile == "gpu" else 0)


def _edit(path: str, value):
    config = copy.deepcopy(load_serve_config(CONFIG_DIR / "cpu.yaml"))
    node = config
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    node[keys[-1]] = value
    return config


@pytest.mark.parametrize("path,value,message", [
    ("applications.0.deployments.1.autoscaling_config.max_replica", 3,
     r"applications\[0\]\.deployments\[1\]\(ImageModel\)\.autoscaling_config\.max_replica: unknown key "
     r"\(did you mean max_replicas\?\)"),
    ("applications.0.deployments.1.autoscaling_config.min_replicas", 5, r"autoscaling_config.*max_replicas"),
    ("applications.0.deployments.1.ray_actor_options.num_gpu", 1, r"ray_actor_options\.num_gpu: unknown key"),
    ("applications.0.deployments.1.max_ongoing_request", 4, r"\(ImageModel\)\.max_ongoing_request: unknown key"),
    ("applications.0.deployments.1.user_config.max_batch", 4, r"user_config\.max_batch: unknown key"),
    ("applications.0.deployments.1.user_config.max_batch_size", 0, r"user_config\.max_batch_size: must be >= 1"),
    ("applications.0.deployments.1.user_config.device", "tpu", r"user_config\.device: must be one of"),
    ("applications.0.deployments.1.max_ongoing_requests", 4, r"max_ongoing_requests: 4 < user_config"),
    ("applications.0.deployments.1.num_replicas", 2, r"num_replicas: give either"),
    ("applications.0.deployments.0.user_config.overload_status", 500, r"overload_status: must be one of 429, 503"),
    ("applications.0.deployments.0.name", "Ingress", r"name: unknown deployment 'Ingress'"),
    ("applications.0.import_path", "other.app:app", r"import_path: must be serving.app:app"),
    ("http_options.hots", "0.0.0.0", r"config\.http_options\.hots: unknown key \(did you mean host\?\)"),
    ("proxy_locaton", "HeadOnly", r"config\.proxy_locaton: unknown key"),
    ("applications.0.deployments.1.backpressure_config", {"status_code": 503, "retry_after": 2},
     r"backpressure_config"),
])
def test_config_validation_names_the_bad_key(path, value, message):
    with pytest.raises(ValueError, match=message):
        validate_serve_config(_edit(path, value))


def test_cuda_without_a_gpu_and_overrides():
    gpu = load_serve_config(CONFIG_DIR / "gpu.yaml")
    with pytest.raises(ValueError, match="num_gpus: device cuda needs num_gpus"):
        with_overrides(gpu, deployments={"ImageModel": {"ray_actor_options": {"num_cpus": 1}}})
    cpu = with_overrides(load_serve_config(CONFIG_DIR / "cpu.yaml"), http_port=18123, model_source="/x/bundle",
                         model={"max_batch_size": 1})
    model = [d for d in cpu["applications"][0]["deployments"] if d["name"] == "ImageModel"][0]
    assert cpu["http_options"]["port"] == 18123
    assert model["user_config"]["model_source"] == "/x/bundle" and model["user_config"]["max_batch_size"] == 1


def test_cli_check_and_bad_config_exit_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from serving.cli import cli

    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIG_DIR / "cpu.yaml").read_text().replace("max_replicas: 2", "max_replica: 2"))
    result = CliRunner().invoke(cli, ["check", "--config", str(bad)])
    assert result.exit_code == 2 and "max_replica: unknown key" in result.output
    assert "Traceback" not in result.output
    ok = CliRunner().invoke(cli, ["check", "--config", str(CONFIG_DIR / "cpu.yaml")])
    assert ok.exit_code == 0 and "/models/bundle" in ok.output
