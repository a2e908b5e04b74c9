"""Deploy a validated config: to a running Serve through the dashboard's REST API (what
``serve deploy`` does; the CLI's path), or in this process with ``serve.run`` (tests, benchmarks).
Both take the same YAML profile, so what a test runs is what ``make serve`` deploys."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from .config import INGRESS, MODEL, resolve_paths, validate_serve_config


def application_from_config(config: dict, app: int = 0):
    """The bound Serve application with every deployment's options taken from ``config``."""
    from .app import ImageIngress, ImageModel

    config = resolve_paths(validate_serve_config(config))
    deps = {d["name"]: {k: v for k, v in d.items() if k != "name"}
            for d in config["applications"][app].get("deployments") or []}
    model = ImageModel.options(**deps.get(MODEL, {}))
    ingress = ImageIngress.options(**deps.get(INGRESS, {}))
    return ingress.bind(model.bind())


def run_in_process(config: dict, app: int = 0, wait_s: float = 300.0) -> str:
    """``serve.start`` with the config's http_options and ``serve.run`` of its application in the
    current Ray session; returns the base URL once /healthz answers."""
    from ray import serve

    config = validate_serve_config(config)
    http = config.get("http_options") or {}
    serve.start(http_options={"host": http.get("host", "127.0.0.1"), "port": http.get("port", 8000),
                              **({"request_timeout_s": http["request_timeout_s"]}
                                 if http.get("request_timeout_s") else {})})
    spec = config["applications"][app]
    serve.run(application_from_config(config, app), name=spec.get("name", "default"),
              route_prefix=spec.get("route_prefix", "/"))
    url = base_url(config, app)
    wait_healthy(url, wait_s)
    return url


def deploy_rest(config: dict, dashboard_url: str) -> None:
    """PUT the config (paths resolved) to a cluster's Serve REST API, as ``serve deploy`` does."""
    body = json.dumps(resolve_paths(validate_serve_config(config))).encode()
    request = urllib.request.Request(f"{dashboard_url.rstrip('/')}/api/serve/applications/", data=body,
                                     method="PUT", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            reply.read()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"deploy: the dashboard at {dashboard_url} refused the config "
                           f"({exc.code}: {exc.read().decode(errors='replace')[:500]})") from None
    except OSError as exc:
        raise RuntimeError(f"deploy: cannot reach the dashboard at {dashboard_url} ({exc})") from None


def base_url(config: dict, app: int = 0) -> str:
    http = config.get("http_options") or {}
    host = http.get("host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    prefix = (config["applications"][app].get("route_prefix") or "/").rstrip("/")
    return f"http://{host}:{http.get('port', 8000)}{prefix}"


def probe(url: str, timeout_s: float = 5.0) -> tuple[int, dict | str]:
    """GET ``url/healthz``: (status, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=timeout_s) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (OSError, ValueError) as exc:
        return 0, str(exc)


def wait_healthy(url: str, timeout_s: float = 300.0, on_poll=None) -> dict:
    """Poll /healthz until it says ok; RuntimeError with the last answer after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    status, body = 0, "no answer"
    while time.monotonic() < deadline:
        status, body = probe(url)
        if on_poll is not None:
            on_poll(status, body)
        if status == 200 and isinstance(body, dict) and body.get("status") in ("ok", "saturated"):
            return body
        time.sleep(1.0)
    raise RuntimeError(f"healthz: {url}/healthz did not answer ok within {timeout_s:.0f}s "
                       f"(last: {status} {str(body)[:300]})")
