"""``python -m serving start|stop|status|deploy|check``: run the service as a real cluster would.

``start`` starts a Ray head of its own (``ray start --head`` on 127.0.0.1, in its own
``--temp-dir`` so no other Ray on the machine is joined or touched), deploys the checked config
through the dashboard's REST API (what ``serve deploy`` does), waits for ``/healthz`` and prints
the URL. ``stop`` shuts the application down and ends exactly the processes of that cluster (found
by its temp dir, ended by PID; never ``ray stop``, which would end every Ray on the machine).
``deploy`` sends the same config to an existing cluster (``--address`` or ``RAY_ADDRESS``).
Bad arguments exit 2 with one line naming the argument.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from mlops.cli import print_error

from .config import DEFAULT_CONFIG, MODEL, load_serve_config, user_config, with_overrides

DEFAULT_TEMP_DIR = "/tmp/bdserve"
STATE_FILE = "budgetdiff_serve.json"

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="budgetdiff's Ray Serve service: start / stop a local cluster, deploy a config.")


def _fail(message: str, code: int = 1):
    print_error(message)
    raise typer.Exit(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _state_path(temp_dir: str) -> Path:
    return Path(temp_dir) / STATE_FILE


def _read_state(temp_dir: str) -> dict | None:
    try:
        return json.loads(_state_path(temp_dir).read_text())
    except (OSError, ValueError):
        return None


def _cluster_pids(temp_dir: str) -> list[int]:
    """PIDs of the Ray processes whose command line names this cluster's temp dir (its GCS,
    raylet, dashboard, agents, workers and replicas), excluding this process and its parents."""
    marker = str(Path(temp_dir).resolve())
    mine = {os.getpid()}
    pid = os.getppid()
    while pid > 1 and pid not in mine:
        mine.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in mine:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker + "/session_" in cmdline or f"--temp-dir={marker}" in cmdline or \
                f"--temp_dir={marker}" in cmdline:
            pids.append(int(proc.name))
    return sorted(pids)


def _session_pids_from_workers(temp_dir: str) -> list[int]:
    """Workers do not always carry the temp dir on their command line: add the processes whose
    parent is one of the cluster's (raylet -> workers -> replicas)."""
    roots = set(_cluster_pids(temp_dir))
    changed = True
    while changed:
        changed = False
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) in roots or int(proc.name) == os.getpid():
                continue
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid in roots:
                roots.add(int(proc.name))
                changed = True
    return sorted(roots)


def _ray_bin() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def _dashboard_from_env() -> str | None:
    if os.environ.get("RAY_DASHBOARD_ADDRESS"):
        return os.environ["RAY_DASHBOARD_ADDRESS"]
    address = os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return None
    if address.startswith(("http://", "https://")):
        return address
    host = address.replace("ray://", "").rsplit(":", 1)[0]
    return f"http://{host}:8265"


def _load(config: Path, http_port: Optional[int], model: Optional[str], host: Optional[str] = None,
          registry_poll_s: Optional[float] = None) -> dict:
    try:
        poll = None if registry_poll_s is None else {"registry_poll_s": registry_poll_s}
        return with_overrides(load_serve_config(config), http_port=http_port, model_source=model, host=host, model=poll)
    except ValueError as exc:
        _fail(str(exc), 2)


@cli.command()
def check(config: Path = typer.Option(DEFAULT_CONFIG, help="Serve config (YAML profile)")):
    """Validate a config (every nested key) and print it as deployed."""
    import yaml

    from .config import resolve_paths

    cfg = _load(config, None, None)
    typer.echo(yaml.safe_dump(resolve_paths(cfg), sort_keys=False))


@cli.command()
def start(
    config: Path = typer.Option(DEFAULT_CONFIG, help="Serve config (YAML profile)"),
    http_port: Optional[int] = typer.Option(None, help="HTTP port (default: the config's)"),
    ray_port: int = typer.Option(6390, help="the Ray head's GCS port"),
    dashboard_port: int = typer.Option(8266, help="the dashboard / Serve REST port"),
    metrics_port: Optional[int] = typer.Option(None, help="Prometheus metrics export port (default: free)"),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs the head offers (default: all)"),
    model: Optional[str] = typer.Option(None, help="model_source override: a bundle directory or a registry URI "
                                         "(models:/budgetdiff@champion)"),
    registry_poll_s: Optional[float] = typer.Option(None, help="with a registry alias: look it up every N s and swap "
                                                     "in the version it names (default: the config's)"),
    temp_dir: str = typer.Option(DEFAULT_TEMP_DIR, help="this cluster's Ray temp dir (keeps it apart)"),
    timeout: float = typer.Option(300.0, help="seconds to wait for /healthz"),
):
    """Start a local Ray head on 127.0.0.1, deploy the config, wait for /healthz, print the URL."""
    from rich.console import Console

    from .deploy import base_url, deploy_rest, probe, wait_healthy

    console = Console(stderr=True)
    cfg = _load(config, http_port, model, registry_poll_s=registry_poll_s)
    http = cfg.get("http_options") or {}
    port = int(http.get("port", 8000))
    state = _read_state(temp_dir)
    if state and _cluster_pids(temp_dir):
        _fail(f"a cluster from {temp_dir} is already running ({state.get('url')}); "
              f"stop it first: python -m serving stop --temp-dir {temp_dir}")
    for name, p in (("--http-port", port), ("--ray-port", ray_port), ("--dashboard-port", dashboard_port)):
        if _port_in_use(p):
            _fail(f"{name}: port {p} on 127.0.0.1 is in use; choose another", 2)
    for name, p in (("--ray-port", ray_port), ("--dashboard-port", dashboard_port)):
        if 10002 <= p <= 19999:
            _fail(f"{name}: {p} is inside Ray's worker port range 10002-19999; choose another", 2)
    metrics_port = metrics_port or _free_port()
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    cmd = [_ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={ray_port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
           f"--temp-dir={Path(temp_dir).resolve()}", f"--metrics-export-port={metrics_port}",
           f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
           f"--runtime-env-agent-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
           "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")  # the proxy starts slowly on a busy machine
    from monitoring.names import LATENCY_MS_BUCKETS

    env.setdefault("RAY_SERVE_REQUEST_LATENCY_BUCKETS_MS", ",".join(str(b) for b in LATENCY_MS_BUCKETS))
    console.print(f"[bold]ray start[/] --head on 127.0.0.1:{ray_port} (temp dir {temp_dir})")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        _fail(f"ray start failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-800:]}")
    url = base_url(cfg)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    state = {"temp_dir": str(Path(temp_dir).resolve()), "gcs_address": f"127.0.0.1:{ray_port}",
             "dashboard": dashboard, "metrics_port": metrics_port, "url": url, "config": str(config),
             "started_at": time.time()}
    _state_path(temp_dir).write_text(json.dumps(state, indent=2))
    served = user_config(cfg, MODEL)
    follow = f", following it every {served.registry_poll_s:g} s" if served.registry_poll_s and \
        served.model_source.startswith("models:/") else ""
    console.print(f"deploying {config} via {dashboard}: serves {served.model_source}{follow}")
    deadline = time.monotonic() + 60
    while True:  # the dashboard's Serve REST API comes up a few seconds after ray start
        try:
            deploy_rest(cfg, dashboard)
            break
        except RuntimeError as exc:
            if time.monotonic() > deadline:
                _fail(f"{exc}; the cluster is still running: python -m serving stop --temp-dir {temp_dir}")
            time.sleep(2)
    with console.status("waiting for /healthz (the model replica loads the bundle)") as status:
        try:
            body = wait_healthy(url, timeout, on_poll=lambda s, b: status.update(
                f"waiting for {url}/healthz: {s or 'no answer'}"))
        except RuntimeError as exc:
            _fail(f"{exc}; logs: {temp_dir}/session_latest/logs/serve; "
                  f"stop: python -m serving stop --temp-dir {temp_dir}")
    state["model_version"] = body.get("model_version")
    _state_path(temp_dir).write_text(json.dumps(state, indent=2))
    console.print(f"[green]ready[/]: model {body.get('model_version')}; playground {url}/ ; "
                  f"API {url}/v1/images/generations ; metrics 127.0.0.1:{metrics_port}")
    typer.echo(url)


@cli.command()
def stop(temp_dir: str = typer.Option(DEFAULT_TEMP_DIR, help="the temp dir `start` used"),
         grace: float = typer.Option(15.0, help="seconds between SIGTERM and SIGKILL")):
    """Shut the application down and end the processes of the cluster `start` began (by PID)."""
    state = _read_state(temp_dir)
    if state:
        from .deploy import shutdown_rest

        try:  # graceful: let replicas drain
            shutdown_rest(state["dashboard"])
        except Exception as exc:
            typer.echo(f"serve shutdown did not answer ({type(exc).__name__}); ending the processes", err=True)
    pids = _session_pids_from_workers(temp_dir)
    if not pids:
        _state_path(temp_dir).unlink(missing_ok=True)
        typer.echo(f"nothing running from {temp_dir}")
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.5)
    left = [p for p in pids if Path(f"/proc/{p}").exists()]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _state_path(temp_dir).unlink(missing_ok=True)
    typer.echo(f"stopped {len(pids)} processes of the cluster in {temp_dir}"
               + (f" ({len(left)} needed SIGKILL)" if left else ""))


@cli.command()
def status(temp_dir: str = typer.Option(DEFAULT_TEMP_DIR, help="the temp dir `start` used")):
    """Say whether the cluster `start` began is up and healthy."""
    from .deploy import probe

    state = _read_state(temp_dir)
    if not state:
        _fail(f"no cluster started from {temp_dir}")
    code, body = probe(state["url"])
    typer.echo(json.dumps({"url": state["url"], "healthz": code, "body": body,
                           "processes": len(_cluster_pids(temp_dir))}))
    if code != 200:
        raise typer.Exit(1)


@cli.command()
def deploy(
    config: Path = typer.Option(DEFAULT_CONFIG, help="Serve config (YAML profile)"),
    address: Optional[str] = typer.Option(None, help="dashboard URL (default: RAY_DASHBOARD_ADDRESS, "
                                                     "or RAY_ADDRESS's host on :8265)"),
    model: Optional[str] = typer.Option(None, help="model_source override"),
    wait: bool = typer.Option(True, help="wait for /healthz on the config's host and port"),
    timeout: float = typer.Option(300.0, help="seconds to wait for /healthz"),
):
    """Deploy the config to an existing cluster (the model source must exist on its nodes)."""
    from .deploy import base_url, deploy_rest, wait_healthy

    cfg = _load(config, None, model)
    dashboard = address or _dashboard_from_env()
    if not dashboard:
        _fail("--address: give the cluster's dashboard URL or set RAY_ADDRESS / RAY_DASHBOARD_ADDRESS", 2)
    try:
        deploy_rest(cfg, dashboard)
        if wait:
            body = wait_healthy(base_url(cfg), timeout)
            typer.echo(f"deployed {config} to {dashboard}: model {body.get('model_version')} at {base_url(cfg)}")
        else:
            typer.echo(f"deployed {config} to {dashboard}")
    except RuntimeError as exc:
        _fail(str(exc))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
