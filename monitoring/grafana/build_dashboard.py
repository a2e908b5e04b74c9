"""Writes ``monitoring/grafana/budgetdiff.json``, budgetdiff's Grafana dashboard (schemaVersion 39).

    python monitoring/grafana/build_dashboard.py          # rewrite the JSON
    python monitoring/grafana/build_dashboard.py --check  # exit 1 when the JSON is out of date

The panels are written here, not in the JSON, so that the layout (gridPos) and the ids follow
from the order of the panels. Every query goes to the dashboard variable ``${datasource}`` (a
Prometheus data source chosen at import). Series: monitoring/names.py (ours) and
names.RAY_SERVE_SERIES (Ray Serve's); ``budgetdiff:*`` are recording rules from
monitoring/prometheus/rules.yml. tests/test_monitoring_rules.py checks every expression with
promtool and every metric name against those.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "budgetdiff.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"
MODE = 'mode=~"$mode"'
API = 'route!~"/-/.*"'  # Serve proxy's own routes (/-/healthz, /-/routes) are not API traffic


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict:
    return {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend or "__auto",
            "range": not instant, "instant": instant, "editorMode": "code"}


def panel(kind: str, title: str, targets: list[dict], unit: str = "short", w: int = 8, h: int = 8,
          description: str = "", thresholds: list[tuple[str, float | None]] | None = None,
          log: bool = False, minimum: float | None = None, maximum: float | None = None) -> dict:
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    steps = [{"color": c, "value": v} for c, v in (thresholds or [("green", None)])]
    defaults: dict = {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps},
                      "color": {"mode": "palette-classic" if kind == "timeseries" else "thresholds"}}
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    if kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                              "spanNulls": False,
                              "scaleDistribution": {"type": "log", "log": 10} if log else {"type": "linear"},
                              "thresholdsStyle": {"mode": "line" if thresholds else "off"}}
        options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                   "tooltip": {"mode": "multi", "sort": "desc"}}
    else:  # stat
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "value", "graphMode": "area", "justifyMode": "auto", "textMode": "auto",
                   "orientation": "auto"}
    return {"type": kind, "title": title, "description": description, "datasource": DS, "targets": targets,
            "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options,
            "gridPos": {"w": w, "h": h}}


def ts(title, targets, **kw):
    return panel("timeseries", title, targets, **kw)


def stat(title, targets, **kw):
    kw.setdefault("w", 4)
    kw.setdefault("h", 4)
    return panel("stat", title, targets, **kw)


def quantiles(metric: str, by: str, selector: str = "", qs=(0.5, 0.95, 0.99)) -> list[dict]:
    sel = f"{{{selector}}}" if selector else ""
    label = f"{{{{{by}}}}} " if by else ""
    group = f"le, {by}" if by else "le"
    return [target(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{sel}[{RI}])))",
                   f"{label}p{int(q * 100)}") for q in qs]


def mean(metric: str, by: str = "mode", selector: str = MODE) -> str:
    return (f"sum by ({by}) (rate({metric}_sum{{{selector}}}[{RI}])) / "
            f"sum by ({by}) (rate({metric}_count{{{selector}}}[{RI}]))")


SLO_THRESHOLDS = [("red", None), ("orange", 0.99), ("green", 0.995)]
BURN_THRESHOLDS = [("green", None), ("orange", 6), ("red", 14.4)]

ROWS: list[tuple[str, list[dict]]] = [
    ("Traffic & errors", [
        stat("Availability, 1 h (non-5xx share)",
             [target('1 - budgetdiff:slo_errors:ratio_rate1h{slo="availability"}', "availability")],
             unit="percentunit", thresholds=SLO_THRESHOLDS,
             description="Share of HTTP answers that are not 5xx (Serve proxy), last hour. Objective 99.5 %."),
        stat("HTTP requests/s", [target(f"sum(rate(ray_serve_num_http_requests_total{{{API}}}[{RI}]))", "req/s")],
             unit="reqps"),
        stat("Images/s", [target(f"sum(rate(ray_budgetdiff_images_total{{{MODE}}}[{RI}]))", "images/s")],
             unit="short"),
        stat("5xx share, 5 m", [target('budgetdiff:slo_errors:ratio_rate5m{slo="availability"}', "5xx")],
             unit="percentunit", thresholds=[("green", None), ("orange", 0.005), ("red", 0.072)]),
        stat("Availability burn rate, 1 h", [target('budgetdiff:slo_burn_rate:rate1h{slo="availability"}', "burn")],
             unit="suffix:x", thresholds=BURN_THRESHOLDS,
             description="Error ratio / error budget. 1 = exactly on budget; the page fires at 14.4 (with the 5 m window)."),
        stat("Model versions served", [target("count by (model_version) (ray_budgetdiff_model_info == 1)",
                                              "{{model_version}}")], unit="short",
             description="Replicas per model version (two versions: a rollout or a reconfigure in progress)."),
        ts("API calls by mode and status (model deployment)",
           [target(f"sum by (mode, status) (rate(ray_budgetdiff_requests_total{{{MODE}}}[{RI}]))",
                   "{{mode}} {{status}}")], unit="reqps", w=12),
        ts("HTTP answers by status code (Serve proxy)",
           [target(f"sum by (status_code) (rate(ray_serve_num_http_requests_total{{{API}}}[{RI}]))",
                   "{{status_code}}")], unit="reqps", w=12),
        ts("HTTP errors by code (proxy) and by deployment",
           [target(f"sum by (error_code) (rate(ray_serve_num_http_error_requests_total{{{API}}}[{RI}]))",
                   "proxy {{error_code}}"),
            target(f"sum by (deployment, error_code) (rate(ray_serve_num_deployment_http_error_requests_total[{RI}]))",
                   "{{deployment}} {{error_code}}")], unit="reqps", w=12,
           description="Ray counts 4xx and 5xx as errors here; only 5xx count against availability."),
        ts("Images by mode and auto route",
           [target(f"sum by (mode, route) (rate(ray_budgetdiff_images_total{{{MODE}}}[{RI}]))",
                   "{{mode}} {{route}}")], unit="short", w=12,
           description="Images/s; route is the auto mode's choice (student, or base+skip)."),
    ]),
    ("Latency", [
        ts("Model-side latency by mode (queue + generation)",
           quantiles("ray_budgetdiff_request_latency_ms", "mode", MODE), unit="ms", w=12,
           thresholds=[("green", None), ("red", 30000)],
           description="One API call inside the model deployment. The latency SLO: 99 % under 30 s."),
        ts("End-to-end HTTP latency (Serve proxy)",
           quantiles("ray_serve_http_request_latency_ms", "", API), unit="ms", w=12,
           description="Serve's default buckets jump 10 s -> 60 s: set RAY_SERVE_REQUEST_LATENCY_BUCKETS_MS "
                       "on the head for diffusion-scale resolution."),
        ts("Queue wait before generation starts",
           quantiles("ray_budgetdiff_queue_wait_ms", "mode", MODE, qs=(0.5, 0.95)), unit="ms", w=12,
           description="Per image: step batching, until it joins the denoising pool; request batching, "
                       "until its @serve.batch call starts."),
        ts("Step scheduler queue delay by mode",
           quantiles("ray_budgetdiff_step_queue_delay_ms", "mode", MODE, qs=(0.5, 0.95)), unit="ms", w=12,
           description="Per call: from submission to the replica's step scheduler until its images "
                       "are admitted (step_max_inflight reached: they wait)."),
        ts("Latency SLI: calls under 30 s",
           [target('1 - budgetdiff:slo_errors:ratio_rate5m{slo="latency"}', "5 m"),
            target('1 - budgetdiff:slo_errors:ratio_rate1h{slo="latency"}', "1 h"),
            target('budgetdiff:slo_objective:ratio{slo="latency"}', "objective")],
           unit="percentunit", w=12, maximum=1),
    ]),
    ("Cost", [
        ts("Denoising steps per image (mean) by mode", [target(mean("ray_budgetdiff_steps"), "{{mode}}")]),
        ts("UNet evaluations (NFE) per image (mean) by mode", [target(mean("ray_budgetdiff_nfe"), "{{mode}}")],
           description="A classifier-free-guidance pair evaluated as one batched call counts once."),
        ts("Skip ratio (mean) by mode", [target(mean("ray_budgetdiff_skip_ratio"), "{{mode}}")],
           unit="percentunit", maximum=1,
           description="Share of steps whose noise prediction was reused (AdaptiveDiffusion)."),
        ts("UNet GFLOP/s by mode",
           [target(f"sum by (mode) (rate(ray_budgetdiff_unet_gflops_total{{{MODE}}}[{RI}]))", "{{mode}}")],
           unit="short"),
        ts("UNet GFLOP per image by mode",
           [target(f"sum by (mode) (rate(ray_budgetdiff_unet_gflops_total{{{MODE}}}[{RI}])) / "
                   f"sum by (mode) (rate(ray_budgetdiff_images_total{{{MODE}}}[{RI}]))", "{{mode}}")],
           unit="short"),
        ts("Batch size",
           [target(f"sum(rate(ray_budgetdiff_batch_images_sum[{RI}])) / sum(rate(ray_budgetdiff_batch_images_count[{RI}]))",
                   "images per generation call (mean)"),
            target(f"histogram_quantile(0.95, sum by (le) (rate(ray_budgetdiff_batch_images_bucket[{RI}])))",
                   "images per generation call (p95)"),
            target(f"histogram_quantile(0.5, sum by (le) (rate(ray_serve_actual_batch_size_bucket[{RI}])))",
                   "requests per @serve.batch call (p50)")]),
        ts("Rows per UNet call (step scheduler)",
           [target(f"sum by (model) (rate(ray_budgetdiff_unet_call_rows_sum[{RI}])) / "
                   f"sum by (model) (rate(ray_budgetdiff_unet_call_rows_count[{RI}]))", "{{model}} mean"),
            target(f"histogram_quantile(0.95, sum by (le, model) (rate(ray_budgetdiff_unet_call_rows_bucket[{RI}])))",
                   "{{model}} p95")],
           description="A guided image takes 2 rows; capped by step_max_rows. Low under load on a CPU "
                       "with step_latency_slack set: short requests are not slowed down by long ones."),
    ]),
    ("Quality (shadow evaluation)", [
        stat("Quality SLO, 1 h (images reaching their target)",
             [target('1 - budgetdiff:slo_errors:ratio_rate1h{slo="quality"}', "good")],
             unit="percentunit", thresholds=[("red", None), ("orange", 0.9), ("green", 0.95)], h=8,
             description="Share of shadow-evaluated images whose realised quality reached the request's "
                         "quality target. Objective 95 %."),
        stat("Quality burn rate, 1 h", [target('budgetdiff:slo_burn_rate:rate1h{slo="quality"}', "burn")],
             unit="suffix:x", thresholds=BURN_THRESHOLDS, h=8),
        stat("Shadow evaluations, 1 h", [target('budgetdiff:slo_events:increase1h{slo="quality"}', "evaluations")],
             unit="short", thresholds=[("orange", None), ("green", 20)], h=8,
             description="The quality alerts stay silent below 20 evaluations in their window."),
        ts("Error budget remaining, 30 d",
           [target("budgetdiff:slo_error_budget_remaining:ratio", "{{slo}}")], unit="percentunit", w=6, h=8,
           thresholds=[("red", None), ("orange", 0), ("green", 0.25)], maximum=1,
           description="1 - (30-day error ratio / error budget): 100 % untouched, 0 spent, negative overspent."),
        ts("Burn rate by SLO",
           [target("budgetdiff:slo_burn_rate:rate1h", "{{slo}} 1 h"),
            target("budgetdiff:slo_burn_rate:rate6h", "{{slo}} 6 h")], unit="suffix:x", w=6, h=8,
           thresholds=BURN_THRESHOLDS),
        ts("Realised vs predicted quality (mean) by mode",
           [target(mean("ray_budgetdiff_realised_quality"), "realised {{mode}}"),
            target(mean("ray_budgetdiff_predicted_quality"), "predicted {{mode}}")],
           unit="percentunit", maximum=1, w=12,
           description="Realised: lowest of SSIM, 1-LPIPS, I-CLIP against the reference-step image (shadow). "
                       "Predicted: the budget predictor's quality at the chosen steps."),
        ts("Realised quality p10 / p50 by mode",
           quantiles("ray_budgetdiff_realised_quality", "mode", MODE, qs=(0.1, 0.5)), unit="percentunit",
           maximum=1, w=12),
        ts("Quality SLO good share by mode, 1 h",
           [target('sum by (mode) (rate(ray_budgetdiff_shadow_evaluations_total{slo="good", mode=~"$mode"}[1h])) / '
                   'sum by (mode) (rate(ray_budgetdiff_shadow_evaluations_total{slo=~"good|bad", mode=~"$mode"}[1h]))', "{{mode}}"),
            target('budgetdiff:slo_objective:ratio{slo="quality"}', "objective")],
           unit="percentunit", maximum=1),
        ts("Quality shortfall of images that missed their target",
           quantiles("ray_budgetdiff_quality_shortfall", "mode", MODE, qs=(0.5, 0.9)), unit="short",
           description="Quality target minus realised quality."),
        ts("Shadow scores by metric level (last window)",
           [target("max by (metric) (ray_budgetdiff_shadow_score)", "{{metric}}")], unit="short"),
    ]),
    ("Shadow evaluator", [
        stat("Since the last shadow evaluation",
             [target("time() - max(ray_budgetdiff_shadow_last_eval_timestamp_seconds)", "age")], unit="s",
             thresholds=[("green", None), ("orange", 900), ("red", 1800)], w=6, h=8,
             description="Liveness: the stale alert fires after 30 min without an evaluation while images are sampled."),
        ts("Sampled images by outcome",
           [target(f"sum by (outcome) (rate(ray_budgetdiff_shadow_sampled_total[{RI}]))", "{{outcome}}")],
           unit="short", w=6, description="queued, or dropped because the shadow queue was full"),
        ts("Shadow queue depth", [target("sum(ray_budgetdiff_shadow_queue_depth)", "images waiting")], w=6),
        ts("Shadow evaluations by verdict, and failures",
           [target(f"sum by (mode, slo) (rate(ray_budgetdiff_shadow_evaluations_total{{{MODE}}}[{RI}]))",
                   "{{mode}} {{slo}}"),
            target(f"sum(rate(ray_budgetdiff_shadow_errors_total[{RI}]))", "failed")], unit="short", w=6),
    ]),
    ("Prompt drift", [
        ts("Two-sample test p-values (alert below 0.01)",
           [target("max(ray_budgetdiff_drift_mmd_pvalue)", "kernel MMD"),
            target("max(ray_budgetdiff_drift_c2st_pvalue)", "C2ST")],
           log=True, thresholds=[("red", None), ("green", 0.01)], maximum=1),
        ts("C2ST held-out AUC (0.5: no drift)", [target("max(ray_budgetdiff_drift_c2st_auc)", "AUC")],
           minimum=0.4, maximum=1),
        ts("Served prompts in the drift window", [target("max(ray_budgetdiff_drift_window_prompts)", "prompts")]),
    ]),
    ("Replicas & queues", [
        ts("Healthy replicas by deployment",
           [target("sum by (application, deployment) (ray_serve_deployment_replica_healthy)",
                   "{{application}}/{{deployment}}")], w=6),
        ts("Requests waiting for a replica (Serve handle queues)",
           [target("sum by (deployment) (ray_serve_deployment_queued_queries)", "{{deployment}}")], w=6),
        ts("Images queued per model replica",
           [target("max by (replica) (ray_budgetdiff_queue_depth)", "{{replica}}")], w=6),
        ts("Images denoising per model replica (step scheduler)",
           [target("max by (replica) (ray_budgetdiff_inflight_images)", "{{replica}}")], w=6),
        ts("Requests in progress per replica",
           [target("sum by (deployment, replica) (ray_serve_replica_processing_queries)",
                   "{{deployment}} {{replica}}")], w=6),
    ]),
]


def build() -> dict:
    panels, pid, y = [], 1, 0
    for title, row_panels in ROWS:
        panels.append({"type": "row", "title": title, "id": pid, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y = pid + 1, y + 1
        x, line_h = 0, 0
        for p in row_panels:
            w, h = p["gridPos"]["w"], p["gridPos"]["h"]
            if x + w > 24:
                x, y, line_h = 0, y + line_h, 0
            p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
            p["id"] = pid
            panels.append(p)
            pid, x, line_h = pid + 1, x + w, max(line_h, h)
        y += line_h
    return {
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "description": "budgetdiff on Ray Serve: traffic, latency, compute cost, quality SLO (shadow "
                       "evaluation), prompt drift, replicas. Rules: monitoring/prometheus/rules.yml; "
                       "runbooks: docs/monitoring.md.",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "links": [],
        "panels": panels,
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["budgetdiff", "ray-serve", "slo"],
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1,
             "regex": "", "skipUrlSync": False},
            {"name": "mode", "label": "mode", "type": "query", "datasource": DS,
             "definition": "label_values(ray_budgetdiff_requests_total, mode)",
             "query": {"query": "label_values(ray_budgetdiff_requests_total, mode)", "refId": "PrometheusVariableQueryEditor-VariableQuery"},
             "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
             "hide": 0, "includeAll": True, "allValue": ".*", "multi": True, "options": [], "refresh": 2,
             "regex": "", "skipUrlSync": False, "sort": 1},
        ]},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "budgetdiff: serving, cost, quality, drift",
        "uid": "budgetdiff-main",
        "version": 1,
        "weekStart": "",
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python monitoring/grafana/build_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(OUT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
