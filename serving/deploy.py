"""Deploy a validated config: to a running cluster through the dashboard's REST API (what
``serve deploy`` does; the CLI's path), or from a Ray driver through the Serve controller's
``deploy_apps`` (what that REST handler calls; tests and benchmarks). Both take the same YAML
profile, so what a test runs is what ``make serve`` deploys."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from .config import resolve_paths, validate_serve_config


def deploy_in_process(config: dict) -> None:
    """Deploy ``config`` from this Ray driver exactly as the dashboard's REST handler does
    (controller ``deploy_apps``): the same code-version rules, so changing only a user_config
    reconfigures the running replicas in place. Starts Serve with the config's http_options."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = resolve_paths(validate_serve_config(config))
    http = config.get("http_options") or {}
    serve.start(http_options={k: v for k, v in http.items() if k in ("host", "port", "request_timeout_s")})
    _get_global_client().deploy_apps(ServeDeploySchema(**config))


def wait_deployed(config: dict, timeout_s: float = 300.0, poll_s: float = 0.5) -> float:
    """Wait until every application of ``config`` is RUNNING with all deployments HEALTHY.
    ``deploy_apps`` returns once the controller has the new target; a user_config change is
    applied (``reconfigure``) and new replicas start after that, while the old replicas keep
    answering /healthz. Returns the seconds waited; RuntimeError naming the state after
    ``timeout_s``."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus, DeploymentStatus

    names = [a["name"] for a in config.get("applications") or []]
    start = time.monotonic()
    last = "no status"
    while True:
        time.sleep(poll_s)  # the controller's loop marks the new target DEPLOYING / UPDATING first
        apps = serve.status().applications
        states = {n: apps.get(n) for n in names}
        ok = all(a is not None and a.status == ApplicationStatus.RUNNING and
                 all(d.status == DeploymentStatus.HEALTHY for d in a.deployments.values())
                 for a in states.values())
        if ok:
            return time.monotonic() - start
        last = "; ".join(f"{n}: {a.status if a else 'missing'} "
                         + (", ".join(f"{dn} {d.status}" for dn, d in a.deployments.items()) if a else "")
                         for n, a in states.items())
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"serve: the deployment did not finish within {timeout_s:.0f}s ({last[:300]})")


def run_in_process(config: dict, app: int = 0, wait_s: float = 300.0) -> str:
    """``deploy_in_process`` and wait until /healthz answers; returns the base URL."""
    deploy_in_process(config)
    url = base_url(config, app)
    wait_healthy(url, wait_s)
    wait_deployed(config, wait_s)
    return url


def serve_client(dashboard_url: str):
    """Ray's Serve REST client (what ``serve deploy`` uses; it adds the cluster's auth token)."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available)
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    return ServeSubmissionClient(dashboard_url)


def deploy_rest(config: dict, dashboard_url: str) -> None:
    """Send the config (paths resolved) to a cluster's Serve REST API, as ``serve deploy`` does."""
    config = resolve_paths(validate_serve_config(config))
    try:
        serve_client(dashboard_url).deploy_applications(config)
    except Exception as exc:  # connection refused, 401, schema rejected: one line each
        raise RuntimeError(f"deploy: the dashboard at {dashboard_url} did not take the config "
                           f"({type(exc).__name__}: {str(exc).strip().splitlines()[-1][:400] if str(exc).strip() else ''})") from None


def shutdown_rest(dashboard_url: str) -> None:
    """Delete every Serve application of the cluster (``serve shutdown``)."""
    serve_client(dashboard_url).delete_applications()


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
