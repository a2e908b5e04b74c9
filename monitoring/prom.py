"""``python -m monitoring.prom start|stop|status|config``: Prometheus for the local service.

``start`` renders ``monitoring/prometheus/prometheus.yml.in`` (the Ray cluster's file-SD target
list, our rules), checks it with ``promtool``, starts Debian's ``prometheus`` in the background
(its own process group, ``--web.listen-address`` 127.0.0.1:9095 and ``--storage.tsdb.path`` under
``logs/prometheus`` by default; never the packaged service on :9090), writes a pid file, waits for
``/-/ready`` and prints the URL as its last line. ``stop`` ends only the process named by that pid
file, and only when its command line is the one ``start`` gave it. ``status`` prints one JSON line
(targets up/down, rule groups, firing alerts). ``config`` prints the rendered config.

Errors are one line (``prometheus: not installed; run make setup-system``); bad arguments exit 2.
The Makefile's ``monitor`` / ``monitor-stop`` / ``monitor-check`` targets call this.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from mlops.cli import print_error
from mlops.repo import REPO_ROOT

PROM_DIR = Path(__file__).resolve().parent / "prometheus"
TEMPLATE = PROM_DIR / "prometheus.yml.in"
RULES = PROM_DIR / "rules.yml"

DEFAULT_TEMP_DIR = "/tmp/bdserve"  # serving.cli.DEFAULT_TEMP_DIR (`make serve`'s SERVE_TEMP_DIR)
DEFAULT_LISTEN = "127.0.0.1:9095"  # not 9090: that is the packaged prometheus.service's port
DEFAULT_DIR = REPO_ROOT / "logs" / "prometheus"
SD_FILE_NAME = "prom_metrics_service_discovery.json"  # ray._private.ray_constants
DEFAULT_SCRAPE_INTERVAL = "15s"
DEFAULT_SD_REFRESH = "30s"
DEFAULT_RETENTION = "30d"  # the SLO period: error-budget panels look 30 days back

_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class UsageError(ValueError):
    """A bad argument: exit 2 with one line naming it."""


def _fail(message: str, code: int = 1):
    print_error(message)
    raise SystemExit(code)


def duration_seconds(value: str, name: str) -> float:
    m = _DURATION.match(value or "")
    if not m or int(m.group(1)) == 0:
        raise UsageError(f"{name}: {value!r} is not a Prometheus duration like 15s, 1m or 500ms")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = (value or "").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen: {value!r} is not HOST:PORT (e.g. {DEFAULT_LISTEN})")
    return host, int(port)


def sd_file(temp_dir: str | os.PathLike) -> Path:
    """The file-SD target list a Ray cluster started with ``--temp-dir`` keeps up to date."""
    return Path(temp_dir).expanduser().resolve() / SD_FILE_NAME


def render_config(temp_dir: str | os.PathLike = DEFAULT_TEMP_DIR, listen: str = DEFAULT_LISTEN,
                  scrape_interval: str = DEFAULT_SCRAPE_INTERVAL, evaluation_interval: str | None = None,
                  rules: str | os.PathLike = RULES, sd_refresh_interval: str = DEFAULT_SD_REFRESH) -> str:
    """The Prometheus config: ``prometheus.yml.in`` with its fields filled in and checked."""
    interval = duration_seconds(scrape_interval, "--scrape-interval")
    evaluation_interval = evaluation_interval or scrape_interval
    duration_seconds(evaluation_interval, "--evaluation-interval")
    duration_seconds(sd_refresh_interval, "--sd-refresh-interval")
    parse_listen(listen)
    rules = Path(rules).expanduser().resolve()
    if not rules.is_file():
        raise UsageError(f"--rules: {rules} does not exist")
    # scrape_timeout may not exceed the interval: Prometheus' default 10s, or the interval if shorter
    timeout = scrape_interval if interval < 10 else "10s"
    return string.Template(TEMPLATE.read_text()).substitute(
        scrape_interval=scrape_interval, scrape_timeout=timeout, evaluation_interval=evaluation_interval,
        rules_file=json.dumps(str(rules)), sd_file=json.dumps(str(sd_file(temp_dir))),
        ray_temp_dir=str(Path(temp_dir).expanduser().resolve()), sd_refresh_interval=sd_refresh_interval,
        listen_address=listen)


# --- process helpers ---------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _flag(cmdline: list[str], name: str) -> str | None:
    for arg in cmdline:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _ours(pid: int, config_file: Path) -> bool:
    """Whether ``pid`` is a prometheus that ``start`` launched with this config file."""
    cmd = _cmdline(pid)
    return bool(cmd) and Path(cmd[0]).name.startswith("prometheus") and \
        _flag(cmd, "config.file") == str(config_file)


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _get(url: str, timeout: float = 2.0) -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (urllib.error.URLError, OSError):
        return None, ""


def ready(url: str) -> bool:
    return _get(f"{url}/-/ready")[0] == 200


def _last_error_line(log_file: Path) -> str:
    try:
        lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for ln in reversed(lines[-50:]):
        if "level=error" in ln or "err=" in ln or "error" in ln.lower():
            return ln[-300:]
    return lines[-1][-300:] if lines else "empty log"


def _promtool_check(promtool: str, config_file: Path) -> None:
    proc = subprocess.run([promtool, "check", "config", str(config_file)], capture_output=True, text=True)
    if proc.returncode != 0:
        out = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        _fail(f"promtool rejects the generated {config_file}: {out[-1] if out else proc.returncode}")


# --- commands ---------------------------------------------------------------------------------------

def cmd_config(args) -> None:
    text = render_config(args.temp_dir, args.listen, args.scrape_interval, args.evaluation_interval,
                         args.rules, args.sd_refresh_interval)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(args.out)
    else:
        sys.stdout.write(text)


def _paths(args) -> tuple[Path, Path, Path, Path]:
    base = Path(args.dir).expanduser().resolve()
    data_dir = getattr(args, "data_dir", None)
    data = Path(data_dir).expanduser().resolve() if data_dir else base / "data"
    return base / "prometheus.yml", base / "prometheus.pid", base / "prometheus.log", data


def cmd_start(args) -> None:
    binary = args.prometheus_bin or shutil.which("prometheus")
    if not binary or not Path(binary).is_file() or not os.access(binary, os.X_OK):
        _fail("prometheus: not installed; run make setup-system")
    host, port = parse_listen(args.listen)
    url = f"http://{host}:{port}"
    config_file, pid_file, log_file, data_dir = _paths(args)
    text = render_config(args.temp_dir, args.listen, args.scrape_interval, args.evaluation_interval,
                         args.rules, args.sd_refresh_interval)
    duration_seconds(args.retention, "--retention")

    pid = _read_pid(pid_file)
    if pid and _pid_alive(pid) and _ours(pid, config_file):
        running_url = f"http://{_flag(_cmdline(pid), 'web.listen-address')}"
        if ready(running_url):
            print(f"prometheus already running (pid {pid}, {pid_file}); stop it with make monitor-stop",
                  file=sys.stderr)
            print(running_url)
            return
        _fail(f"prometheus pid {pid} from {pid_file} runs but {running_url}/-/ready does not answer; "
              f"log: {log_file}; stop it with make monitor-stop")
    if _port_in_use(host, port):
        _fail(f"--listen: {host}:{port} is in use; choose another (make monitor MONITOR_LISTEN=127.0.0.1:PORT)", 2)

    config_file.parent.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    config_file.write_text(text)
    promtool = shutil.which("promtool") or str(Path(binary).with_name("promtool"))
    if Path(promtool).is_file():
        _promtool_check(promtool, config_file)

    cmd = [binary, f"--config.file={config_file}", f"--storage.tsdb.path={data_dir}",
           f"--storage.tsdb.retention.time={args.retention}", f"--web.listen-address={host}:{port}",
           "--web.enable-lifecycle"]
    with open(log_file, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(config_file.parent))
    pid_file.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + args.timeout
    while not ready(url):
        code = proc.poll()
        if code is not None:
            pid_file.unlink(missing_ok=True)
            _fail(f"prometheus exited with code {code}: {_last_error_line(log_file)} (log: {log_file})")
        if time.monotonic() > deadline:
            _fail(f"prometheus (pid {proc.pid}) not ready at {url}/-/ready after {args.timeout:.0f} s; "
                  f"log: {log_file}; stop it with make monitor-stop")
        time.sleep(0.3)
    print(f"prometheus ready (pid {proc.pid}): scraping {sd_file(args.temp_dir)} every "
          f"{args.scrape_interval}; rules {Path(args.rules).resolve()}; data {data_dir}; log {log_file}",
          file=sys.stderr)
    print(url)


def cmd_stop(args) -> None:
    config_file, pid_file, _, _ = _paths(args)
    pid = _read_pid(pid_file)
    if pid is None:
        print(f"prometheus: nothing to stop (no pid file {pid_file})")
        return
    if not _pid_alive(pid):
        pid_file.unlink(missing_ok=True)
        print(f"prometheus: pid {pid} is not running; removed the stale {pid_file}")
        return
    if not _ours(pid, config_file):
        _fail(f"pid {pid} in {pid_file} is not the prometheus started with {config_file}; not stopping it")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.grace
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = _pid_alive(pid)
    if killed:
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    print(f"stopped prometheus (pid {pid})" + (" with SIGKILL" if killed else ""))


def cmd_status(args) -> None:
    config_file, pid_file, log_file, _ = _paths(args)
    pid = _read_pid(pid_file)
    if pid is None or not _pid_alive(pid) or not _ours(pid, config_file):
        print(json.dumps({"running": False, "pid_file": str(pid_file)}))
        raise SystemExit(1)
    url = f"http://{_flag(_cmdline(pid), 'web.listen-address')}"
    report: dict = {"running": True, "pid": pid, "url": url, "ready": ready(url), "log": str(log_file)}
    code, body = _get(f"{url}/api/v1/targets?state=active")
    if code == 200:
        targets = json.loads(body)["data"]["activeTargets"]
        report["targets"] = {h: sum(t["health"] == h for t in targets) for h in ("up", "down", "unknown")}
    code, body = _get(f"{url}/api/v1/rules")
    if code == 200:
        groups = json.loads(body)["data"]["groups"]
        report["rule_groups"] = len(groups)
        report["rule_errors"] = [r["name"] for g in groups for r in g["rules"] if r.get("health") == "err"]
    code, body = _get(f"{url}/api/v1/alerts")
    if code == 200:
        report["alerts"] = sorted(f"{a['labels']['alertname']}:{a['state']}" for a in json.loads(body)["data"]["alerts"])
    print(json.dumps(report))
    if not report["ready"]:
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m monitoring.prom", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def config_options(p):
        p.add_argument("--temp-dir", default=DEFAULT_TEMP_DIR,
                       help="the Ray cluster's --temp-dir (make serve's SERVE_TEMP_DIR); its file-SD list is scraped")
        p.add_argument("--listen", default=DEFAULT_LISTEN, help="Prometheus' HOST:PORT")
        p.add_argument("--scrape-interval", default=DEFAULT_SCRAPE_INTERVAL)
        p.add_argument("--evaluation-interval", default=None, help="rule evaluation interval (default: the scrape interval)")
        p.add_argument("--sd-refresh-interval", default=DEFAULT_SD_REFRESH, help="how often the SD file is re-read")
        p.add_argument("--rules", default=str(RULES))

    def dir_options(p):
        p.add_argument("--dir", default=str(DEFAULT_DIR),
                       help="where the rendered config, pid file, log and (default) data live")

    p = sub.add_parser("config", help="print the rendered prometheus.yml")
    config_options(p)
    p.add_argument("--out", default=None, help="write it to this file instead of stdout")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("start", help="start prometheus in the background; wait for /-/ready; print the URL")
    config_options(p)
    dir_options(p)
    p.add_argument("--data-dir", default=None, help="--storage.tsdb.path (default: DIR/data)")
    p.add_argument("--retention", default=DEFAULT_RETENTION)
    p.add_argument("--prometheus-bin", default=None, help="the prometheus binary (default: on PATH)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for /-/ready")
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("stop", help="stop the prometheus that start launched (by its pid file)")
    dir_options(p)
    p.add_argument("--grace", type=float, default=20.0, help="seconds between SIGTERM and SIGKILL")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("status", help="one JSON line: running, ready, targets, rule groups, alerts")
    dir_options(p)
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UsageError as exc:
        _fail(str(exc), 2)


if __name__ == "__main__":
    main()
