"""``mlflow server`` as a component: start it on 127.0.0.1 (sqlite backend, local artifact root),
probe ``/health`` before reporting it ready, keep a pid file; stop it by that pid file.

    python -m registry.server start [--port 5000] [--db mlflow.db] [--artifacts mlartifacts]
    python -m registry.server stop
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000

The Makefile's ``mlflow-server`` / ``mlflow-server-stop`` targets call these. The database is
created (migrated) here before the server starts: parallel processes opening a fresh sqlite
database race on its migrations.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from mlops.cli import print_error
from mlops.repo import REPO_ROOT



def create_database(db: str | os.PathLike, artifacts: str | os.PathLike) -> str:
    """Create and migrate the sqlite tracking + registry database; returns its URI."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db = Path(db).resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{db}"
    SqlAlchemyStore(uri, Path(artifacts).resolve().as_uri())
    RegistryStore(uri)
    return uri


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def start(host: str = "127.0.0.1", port: int = 5000, db: str | os.PathLike = REPO_ROOT / "mlflow.db",
          artifacts: str | os.PathLike = REPO_ROOT / "mlartifacts", pid_file: str | os.PathLike = REPO_ROOT / "logs" / "mlflow-server.pid",
          log_file: str | os.PathLike | None = None, workers: int = 1, timeout: float = 120.0) -> str:
    """Start the server in the background (its own process group) and wait for ``/health``.
    Returns its URL; raises RuntimeError (one line) when it does not come up in ``timeout`` s."""
    pid_file = Path(pid_file)
    url = f"http://{host}:{port}"
    if pid_file.is_file() and _pid_alive(int(pid_file.read_text().split()[0])):
        if healthy(url):
            return url
        raise RuntimeError(f"mlflow server: {pid_file} names a running process that does not answer {url}/health")
    if healthy(url):
        raise RuntimeError(f"mlflow server: something already answers on {url} (not started from {pid_file})")
    backend = create_database(db, artifacts)
    Path(artifacts).mkdir(parents=True, exist_ok=True)
    log_file = Path(log_file) if log_file else pid_file.with_suffix(".log")
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
           "--default-artifact-root", str(Path(artifacts).resolve()), "--host", host, "--port", str(port),
           "--workers", str(workers)]
    with open(log_file, "ab") as log:
        # MLflow's job runner (GenAI jobs: a pool of huey consumers) is not used by the registry
        # and costs eight processes on two cores; MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true restores it.
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_TRACKING_URI": backend}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    pid_file.write_text(f"{proc.pid} {url}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pid_file.unlink(missing_ok=True)
            tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"mlflow server exited with {proc.returncode}: {tail[0]} (log: {log_file})")
        if healthy(url):
            return url
        time.sleep(0.5)
    stop(pid_file)
    raise RuntimeError(f"mlflow server: {url}/health did not answer within {timeout:.0f} s (log: {log_file})")


def stop(pid_file: str | os.PathLike = REPO_ROOT / "logs" / "mlflow-server.pid", timeout: float = 20.0) -> bool:
    """Stop the server the pid file names (its whole process group). False if none ran."""
    pid_file = Path(pid_file)
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text().split()[0])
    if not _pid_alive(pid):
        pid_file.unlink(missing_ok=True)
        return False
    os.killpg(pid, signal.SIGTERM)  # started with start_new_session: its group is its own
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid):
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
        except ChildProcessError:
            pass
        time.sleep(0.2)
    if _pid_alive(pid):
        os.killpg(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m registry.server")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=5000)
    s.add_argument("--db", default=str(REPO_ROOT / "mlflow.db"))
    s.add_argument("--artifacts", default=str(REPO_ROOT / "mlartifacts"))
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--timeout", type=float, default=120.0)
    for sp in (s, sub.add_parser("stop")):
        sp.add_argument("--pid-file", default=str(REPO_ROOT / "logs" / "mlflow-server.pid"))
    args = p.parse_args(argv)
    try:
        if args.command == "start":
            url = start(args.host, args.port, args.db, args.artifacts, args.pid_file, workers=args.workers,
                        timeout=args.timeout)
            print(f"mlflow server ready at {url} (pid file {args.pid_file}); export MLFLOW_TRACKING_URI={url}")
        else:
            print("mlflow server stopped" if stop(args.pid_file) else "mlflow server: none running")
    except (RuntimeError, OSError) as exc:
        return print_error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
