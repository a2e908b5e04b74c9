"""End to end: the CPU profile on a real (throw-away, private) Ray cluster, called over HTTP.

One local Ray (``address="local"``: never joins another engineer's cluster), the tiny bundle, a
free loopback port; a real HTTP client (httpx) sends concurrent requests so the replica's step
scheduler (``batching: step``, the profile's) runs more than one image per UNet call, then checks
the reply, errors and the model swap through ``user_config``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket

import pytest

httpx = pytest.importorskip("httpx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_bundle_dir):
    import ray
    from ray import serve

    from serving.config import CONFIG_DIR, load_serve_config, with_overrides
    from serving.deploy import run_in_process

    config = with_overrides(
        load_serve_config(CONFIG_DIR / "cpu.yaml"), http_port=_free_port(),
        model={"model_source": str(tiny_bundle_dir), "torch_threads": 1, "max_batch_size": 4,
               "batch_wait_timeout_s": 0.2, "step_max_inflight": 8},  # the profile's step-level batching
        deployments={"ImageModel": {"autoscaling_config": None, "num_replicas": 1, "max_ongoing_requests": 8,
                                    "max_queued_requests": 8, "ray_actor_options": {"num_cpus": 1, "num_gpus": 0}}})
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")  # a busy 2-core machine starts slowly
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")  # ...and so does the HTTP proxy
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    try:
        url = run_in_process(config, wait_s=240)
        yield url, config
    finally:
        serve.shutdown()
        ray.shutdown()


def test_service_end_to_end_over_http(served, tiny_bundle_dir, tmp_path):
    from PIL import Image

    url, config = served
    body = {"prompt": "a small red circle at the top left", "mode": "full", "steps": 4, "size": "16x16"}

    async def burst(seeds):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/images/generations", json={**body, "seed": s})
                                          for s in seeds))

    # concurrent requests share UNet calls; every reply is OpenAI-shaped and names its model version
    replies = asyncio.run(burst(range(6)))
    assert [r.status_code for r in replies] == [200] * 6, [r.text for r in replies]
    records = [r.json()["data"][0]["record"] for r in replies]
    assert max(rec["batch_images"] for rec in records) >= 2 and {rec["batching"] for rec in records} == {"step"}
    assert {rec["seed"] for rec in records} == set(range(6))
    image = Image.open(io.BytesIO(base64.b64decode(replies[0].json()["data"][0]["b64_json"])))
    assert image.size == (16, 16)
    version = replies[0].json()["model_version"]
    assert {r.headers["x-model-version"] for r in replies} == {version}

    with httpx.Client(base_url=url, timeout=60) as client:
        health = client.get("/healthz").json()
        assert health["model_version"] == version and health["replica"]
        assert client.get("/v1/models").json()["data"][0]["sizes"] == ["16x16"]
        bad = client.post("/v1/images/generations", json={**body, "size": "512x512"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "size"
        assert "16x16" in bad.json()["error"]["message"]
        assert client.get("/").status_code == 200


def test_wait_deployed_returns_once_the_replicas_run_the_new_user_config(served):
    """deploy_apps returns before a user_config change reaches the replicas (the old ones keep
    answering /healthz); wait_deployed returns only once Serve reports the update applied."""
    from serving.config import with_overrides
    from serving.deploy import deploy_in_process, wait_deployed

    url, config = served
    try:
        for size in (2, 4):  # 4: the fixture's, restored for the tests after this one
            deploy_in_process(with_overrides(config, model={"max_batch_size": size}))
            wait_deployed(config, 120)
            with httpx.Client(base_url=url, timeout=60) as client:
                assert client.get("/v1/models").json()["data"][0]["max_batch_size"] == size
    finally:
        deploy_in_process(config)
        wait_deployed(config, 120)


def test_user_config_update_swaps_the_model_in_place_under_traffic(served, tiny_bundle_dir, tmp_path):
    """A new bundle through user_config: the replica reconfigures in place, no request fails."""
    from serving.config import with_overrides
    from serving.deploy import deploy_in_process
    from tests.test_serving import _bundle_with_other_policy

    url, config = served
    body = {"prompt": "a small red circle at the top left", "size": "16x16"}
    with httpx.Client(base_url=url, timeout=60) as client:
        health = client.get("/healthz").json()
    version = health["model_version"]
    other = _bundle_with_other_policy(tiny_bundle_dir, tmp_path)
    updated = with_overrides(config, model={"model_source": str(other)})

    async def traffic_with_update():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async def loop(stop):
                out = []
                while not stop.is_set():
                    out.append(await client.post("/v1/images/generations",
                                                 json={**body, "mode": "adaptive", "steps": 6, "seed": 1}))
                return out
            stop = asyncio.Event()
            workers = [asyncio.create_task(loop(stop)) for _ in range(2)]
            await asyncio.to_thread(deploy_in_process, updated)  # a user_config change: in place
            for _ in range(120):
                if (await client.get("/healthz")).json().get("model_version") != version:
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.0)
            stop.set()
            return [r for w in workers for r in await w]

    during = asyncio.run(traffic_with_update())
    assert during and all(r.status_code == 200 for r in during), [r.text for r in during if r.status_code != 200]
    versions = [r.json()["model_version"] for r in during]
    assert versions[-1] != version and set(versions) <= {version, versions[-1]}
    with httpx.Client(base_url=url, timeout=60) as client:
        after = client.get("/healthz").json()
    assert after["replica"] == health["replica"] and after["swaps"] == 1  # reconfigured in place
