"""Prometheus side of monitoring: the generated config, the alert/recording rules and their unit
tests, the Grafana dashboard, and the controller (``python -m monitoring.prom``), all checked with
Debian's ``promtool`` / ``prometheus``. Without them every test here fails and says to run
``make setup-system`` (they never skip)."""

from __future__ import annotations

import http.server
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml

from monitoring import names

from conftest import REPO

PROM_DIR = REPO / "monitoring" / "prometheus"
RULES = PROM_DIR / "rules.yml"
RULES_TEST = PROM_DIR / "rules_test.yml"
DASHBOARD = REPO / "monitoring" / "grafana" / "budgetdiff.json"
DOCS = REPO / "docs" / "monitoring.md"
SD_NAME = "prom_metrics_service_discovery.json"

# Series Prometheus makes itself (not exported by any code of ours or Ray's)
PROMETHEUS_SERIES = {"up"}
SEVERITIES = {"critical", "warning"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} not found on PATH: run `make setup-system` (root; installs Debian's prometheus "
                    f"package, which ships prometheus and promtool)", pytrace=False)
    return path


@pytest.fixture(scope="module")
def promtool() -> str:
    return _tool("promtool")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, **kw)


def _prom_cli(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "monitoring.prom", *args], cwd=REPO)


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _alerts() -> list[dict]:
    return [r for r in _rules() if "alert" in r]


def _recorded() -> set[str]:
    return {r["record"] for r in _rules() if "record" in r}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _fake_ray_temp_dir(root: Path, targets: list[str]) -> Path:
    """A Ray 2.60 temp dir as `ray start --temp-dir` leaves it: the SD file in the session dir,
    a symlink to it at the temp dir's top."""
    session = root / "session_2026-01-01_00-00-00_000000_1"
    session.mkdir(parents=True)
    (session / SD_NAME).write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))
    (root / SD_NAME).symlink_to(session / SD_NAME)
    (root / "session_latest").symlink_to(session)
    return root


# --- PromQL: the metric names an expression reads -------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan"}
_GRAFANA_VARS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h", "mode": ".*"}


def grafana_to_promql(expr: str) -> str:
    def sub(m):
        name = m.group(1) or m.group(2)
        if name not in _GRAFANA_VARS:
            raise AssertionError(f"unknown dashboard variable ${name} in {expr}")
        return _GRAFANA_VARS[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords, label
    names (inside {...}, by/without/on/ignoring/group_*(...)), strings, durations or numbers."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    found = set()
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", s):
        if m.group(1).lower() not in _KEYWORDS:
            found.add(m.group(1))
    return found


def test_metric_name_parser():
    assert metric_names('histogram_quantile(0.9, sum by (le, mode) (rate(a_bucket{le=~"1(\\\\.0)?"}[5m])))') == {"a_bucket"}
    assert metric_names('1 - x:y:z{slo="q"} / on(slo) group_left(k) b_total offset 5m > bool 1e3') == \
        {"x:y:z", "b_total"}
    assert metric_names('label_replace(m < 0.01, "test", "mmd", "", "") or time() - max(n)') == {"m", "n"}


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every target and every query variable of the dashboard."""
    out = []
    for p in _dashboard()["panels"]:
        for t in p.get("targets", []):
            out.append((f"panel {p['id']} ({p['title']}) {t['refId']}", grafana_to_promql(t["expr"])))
    for v in _dashboard()["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", v["definition"])
            assert m, f"variable {v['name']}: only label_values(SERIES, LABEL) is supported here"
            out.append((f"variable {v['name']}", m.group(1)))
    return out


# --- the generated Prometheus config ---------------------------------------------------------------

def test_generated_config_passes_promtool(tmp_path, promtool):
    ray_dir = _fake_ray_temp_dir(tmp_path / "ray", ["127.0.0.1:50001", "127.0.0.1:50002"])
    out = tmp_path / "prometheus.yml"
    proc = _prom_cli("config", "--temp-dir", str(ray_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(out.read_text())
    assert cfg["global"]["scrape_interval"] == "15s" and cfg["global"]["evaluation_interval"] == "15s"
    assert cfg["rule_files"] == [str(RULES)]
    ray_job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "ray")
    assert ray_job["file_sd_configs"][0]["files"] == [str(ray_dir / SD_NAME)]
    check = _run([promtool, "check", "config", str(out)])
    assert check.returncode == 0 and "SUCCESS" in check.stdout + check.stderr, check.stdout + check.stderr
    assert "WARNING" not in check.stdout + check.stderr  # the SD file was found through the symlink

    # promtool really reads the SD file: a broken one fails the check
    (ray_dir / "session_latest" / SD_NAME).write_text("not json")
    assert _run([promtool, "check", "config", str(out)]).returncode != 0

    # a short interval gets a scrape_timeout that fits in it
    proc = _prom_cli("config", "--temp-dir", str(ray_dir), "--scrape-interval", "5s")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["global"]["scrape_timeout"] == "5s"


@pytest.mark.parametrize("args, message", [
    (["config", "--scrape-interval", "15"], "--scrape-interval"),
    (["config", "--listen", "9095"], "--listen"),
    (["config", "--rules", "/nonexistent/rules.yml"], "--rules"),
])
def test_controller_rejects_bad_arguments_in_one_line(args, message):
    proc = _prom_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_controller_says_when_prometheus_is_missing(tmp_path):
    proc = _prom_cli("start", "--prometheus-bin", str(tmp_path / "no-prometheus"), "--dir", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: prometheus: not installed; run make setup-system"
    assert not (tmp_path / "prometheus.pid").exists()


class _FakeRayMetrics(http.server.BaseHTTPRequestHandler):
    BODY = (b'# TYPE ray_serve_deployment_replica_healthy gauge\n'
            b'ray_serve_deployment_replica_healthy{application="budgetdiff",deployment="ImageModel",replica="r1"} 1\n'
            b'# TYPE ray_budgetdiff_requests_total counter\n'
            b'ray_budgetdiff_requests_total{mode="auto",status="ok"} 3\n')

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(self.BODY)

    def log_message(self, *args):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(url: str, q: str) -> list:
    with urllib.request.urlopen(f"{url}/api/v1/query?query={urllib.parse.quote(q)}", timeout=5) as r:
        return json.loads(r.read())["data"]["result"]


def test_controller_starts_scrapes_the_ray_sd_list_and_stops(tmp_path):
    """`start` runs the real prometheus on its own port and data dir, scrapes a (fake) Ray metrics
    endpoint found through the SD symlink, loads our rules; `stop` ends exactly that process."""
    _tool("prometheus")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeRayMetrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ray_dir = _fake_ray_temp_dir(tmp_path / "ray", [f"127.0.0.1:{server.server_address[1]}"])
    state = tmp_path / "prom"
    listen = f"127.0.0.1:{_free_port()}"
    pid = None
    try:
        proc = _prom_cli("start", "--temp-dir", str(ray_dir), "--dir", str(state), "--listen", listen,
                         "--scrape-interval", "1s", "--timeout", "60")
        assert proc.returncode == 0, proc.stderr
        url = proc.stdout.strip().splitlines()[-1]
        assert url == f"http://{listen}"
        pid = int((state / "prometheus.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert f"--storage.tsdb.path={state / 'data'}".encode() in cmdline
        assert f"--web.listen-address={listen}".encode() in cmdline

        # a second start finds it running and prints the same URL
        again = _prom_cli("start", "--temp-dir", str(ray_dir), "--dir", str(state), "--listen", listen)
        assert again.returncode == 0 and again.stdout.strip() == url, again.stderr

        deadline = time.monotonic() + 30
        while True:
            healthy = _query(url, 'ray_serve_deployment_replica_healthy{job="ray"}')
            status = json.loads(_prom_cli("status", "--dir", str(state)).stdout)
            if healthy and status.get("targets", {}).get("up", 0) >= 2 and status.get("rule_groups"):
                break
            assert time.monotonic() < deadline, f"no scrape after 30 s: {status}"
            time.sleep(0.5)
        assert healthy[0]["metric"]["deployment"] == "ImageModel"
        assert status["running"] and status["ready"] and status["targets"]["down"] == 0
        assert status["rule_groups"] == len(yaml.safe_load(RULES.read_text())["groups"])
        assert status["rule_errors"] == []
    finally:
        stop = _prom_cli("stop", "--dir", str(state))
        server.shutdown()
    assert stop.returncode == 0 and f"stopped prometheus (pid {pid})" in stop.stdout, stop.stdout + stop.stderr
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    assert not (state / "prometheus.pid").exists()
    assert "nothing to stop" in _prom_cli("stop", "--dir", str(state)).stdout
    assert _prom_cli("status", "--dir", str(state)).returncode == 1


def test_controller_never_stops_a_process_it_did_not_start(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "prometheus.pid").write_text(f"{sleeper.pid}\n")
        proc = _prom_cli("stop", "--dir", str(tmp_path))
        assert proc.returncode == 1 and "not stopping it" in proc.stderr
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


# --- rules -----------------------------------------------------------------------------------------

def test_rules_pass_promtool_check(promtool):
    proc = _run([promtool, "check", "rules", str(RULES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_unit_tests_pass(promtool):
    proc = _run([promtool, "test", "rules", str(RULES_TEST)], cwd=PROM_DIR)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_every_alert_is_seen_firing_in_a_unit_test():
    fired, silent = set(), set()
    for group in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    alerts = {a["alert"] for a in _alerts()}
    assert alerts - fired == set(), "alerts no unit test sees firing"
    assert alerts - silent == set(), "alerts no unit test sees staying silent"


def test_every_alert_has_severity_summary_value_and_a_runbook_anchor():
    anchors = {_github_anchor(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", DOCS.read_text(), re.M)}
    for a in _alerts():
        name = a["alert"]
        assert a.get("labels", {}).get("severity") in SEVERITIES, name
        ann = a.get("annotations", {})
        assert ann.get("summary", "").strip(), f"{name}: no summary"
        assert "$value" in ann.get("description", ""), f"{name}: the description does not show the value"
        m = re.fullmatch(r"docs/monitoring\.md#([\w-]+)", ann.get("runbook_url", ""))
        assert m, f"{name}: runbook_url must be docs/monitoring.md#<anchor>"
        assert m.group(1) in anchors, f"{name}: docs/monitoring.md has no heading with anchor #{m.group(1)}"


def _github_anchor(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_latency_slo_threshold_is_a_bucket_boundary_of_the_histogram():
    spec = names.BY_NAME["budgetdiff_request_latency_ms"]
    thresholds = set()
    for r in _rules():
        for m in re.finditer(r'ray_budgetdiff_request_latency_ms_bucket\{le=~"([\d.]+)\(', r["expr"]):
            thresholds.add(float(m.group(1)))
    assert thresholds == {30000.0}
    assert 30000.0 in [float(b) for b in spec.boundaries]


# --- the dashboard ---------------------------------------------------------------------------------

_DS = {"type": "object", "required": ["type", "uid"],
       "properties": {"type": {"const": "prometheus"}, "uid": {"const": "${datasource}"}}}
DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "schemaVersion": {"type": "integer", "minimum": 36},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "templating": {"type": "object", "required": ["list"], "properties": {"list": {
            "type": "array",
            "contains": {"type": "object", "required": ["name", "type", "query"],
                         "properties": {"name": {"const": "datasource"}, "type": {"const": "datasource"},
                                        "query": {"const": "prometheus"}}},
            "items": {"type": "object", "required": ["name", "type"],
                      "if": {"properties": {"type": {"const": "query"}}},
                      "then": {"required": ["datasource", "definition"], "properties": {"datasource": _DS}}}}}},
        "panels": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["type", "title", "id", "gridPos"],
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "title": {"type": "string", "minLength": 1},
                "gridPos": {"type": "object", "required": ["h", "w", "x", "y"], "properties": {
                    "h": {"type": "integer", "minimum": 1}, "w": {"type": "integer", "minimum": 1, "maximum": 24},
                    "x": {"type": "integer", "minimum": 0, "maximum": 23}, "y": {"type": "integer", "minimum": 0}}},
            },
            "if": {"properties": {"type": {"const": "row"}}},
            "then": {"required": ["collapsed", "panels"], "properties": {"panels": {"maxItems": 0}}},
            "else": {"required": ["datasource", "targets"], "properties": {
                "type": {"enum": ["timeseries", "stat", "gauge", "bargauge", "table"]},
                "datasource": _DS,
                "targets": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["refId", "expr", "datasource"],
                    "properties": {"expr": {"type": "string", "minLength": 1}, "refId": {"type": "string"},
                                   "datasource": _DS}}}}},
        }},
    },
}


def test_dashboard_structure():
    dash = _dashboard()
    jsonschema.validate(dash, DASHBOARD_SCHEMA)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), f"{p['title']}: refIds repeat"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    for needed in ("Traffic", "Latency", "Cost", "Quality", "Shadow", "drift", "Replicas"):
        assert any(needed.lower() in r.lower() for r in rows), f"no row about {needed}"


def test_dashboard_json_is_what_the_generator_writes():
    proc = _run([sys.executable, "monitoring/grafana/build_dashboard.py", "--check"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_dashboard_expressions_pass_promtool_as_recording_rules(tmp_path, promtool):
    exprs = _dashboard_exprs()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}:check", "expr": expr} for i, (_, expr) in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    proc = _run([promtool, "check", "rules", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(exprs)} rules found" in proc.stdout


# --- every series named anywhere exists ------------------------------------------------------------

def _known_series() -> set[str]:
    return names.exported_names() | set(names.RAY_SERVE_SERIES) | _recorded() | PROMETHEUS_SERIES


def test_every_metric_in_rules_and_dashboard_is_defined():
    known = _known_series()
    used = {}
    for r in _rules():
        for n in metric_names(r["expr"]):
            used.setdefault(n, f"rules.yml {r.get('alert') or r.get('record')}")
    for where, expr in _dashboard_exprs():
        for n in metric_names(expr):
            used.setdefault(n, f"budgetdiff.json {where}")
    unknown = {n: where for n, where in used.items() if n not in known}
    assert not unknown, f"series defined neither in monitoring/names.py nor by the rules: {unknown}"
    # the rules and dashboard cover the service's own metrics: each spec is read somewhere
    unused = {s.name for s in names.SPECS if not set(s.series()) & set(used)}
    assert not unused, f"metrics in names.SPECS that no rule or panel reads: {unused}"


def _ray_serve_dir() -> Path:
    spec = importlib.util.find_spec("ray")  # located, not imported
    assert spec and spec.submodule_search_locations, "ray is not installed in this environment"
    return Path(list(spec.submodule_search_locations)[0]) / "serve"


def _ray_serve_metric_names() -> set[str]:
    """Metric names registered in the installed Ray Serve source (f-string protocol names expanded)."""
    found = set()
    for path in _ray_serve_dir().rglob("*.py"):
        if "tests" in path.parts:
            continue
        for m in re.finditer(r'f?"(serve_[a-z_{}]+)"', path.read_text(errors="replace")):
            for protocol in ("http", "grpc"):
                found.add(m.group(1).replace("{protocol_name}", protocol))
    return found


def test_ray_serve_series_we_use_exist_in_the_installed_ray():
    source = _ray_serve_metric_names()
    used = set()
    for r in _rules():
        used |= metric_names(r["expr"])
    for _, expr in _dashboard_exprs():
        used |= metric_names(expr)
    for series in sorted(used & set(names.RAY_SERVE_SERIES)):
        base = re.sub(r"^ray_", "", series)
        candidates = {base, re.sub(r"_(total|bucket|sum|count)$", "", base)}
        assert candidates & source, f"{series}: no Ray Serve metric named {candidates} in {_ray_serve_dir()}"
