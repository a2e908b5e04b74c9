"""Every metric the service exports: one table that the exporters, the alert rules, the Grafana
dashboard and their tests read (nothing here imports Ray, so the checks run without it).

Ray exports a metric named ``n`` as ``ray_n``; a counter also gets ``_total`` and a histogram
``_bucket`` / ``_sum`` / ``_count``. ``exported_names()`` lists the series Prometheus sees. Ray adds
the tags ``deployment``, ``replica`` and ``application`` (and ``SessionName``, ``NodeAddress``...)
to every series.
"""

from __future__ import annotations

from dataclasses import dataclass

# Diffusion-scale latency buckets (ms): a CPU image takes seconds, a queued one tens of seconds.
LATENCY_MS_BUCKETS = [50, 100, 250, 500, 1000, 2000, 3000, 5000, 7500, 10_000, 15_000, 20_000, 30_000,
                      45_000, 60_000, 90_000, 120_000, 180_000, 300_000]
STEP_BUCKETS = [1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 25, 30, 40, 50, 75, 100, 150]
RATIO_BUCKETS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
QUALITY_BUCKETS = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
ROW_BUCKETS = [1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]


@dataclass(frozen=True)
class MetricSpec:
    name: str            # what the code registers (Ray prefixes ``ray_``)
    kind: str            # counter | gauge | histogram
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The base series name Prometheus sees."""
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")

    def series(self) -> list[str]:
        if self.kind == "histogram":
            return [f"ray_{self.name}_{s}" for s in ("bucket", "sum", "count")]
        return [self.exported]


SPECS: tuple[MetricSpec, ...] = (
    # --- the serving path (model replicas) -------------------------------------------------------
    MetricSpec("budgetdiff_requests", "counter", "API calls answered by the model deployment, by mode and "
               "outcome (ok, or the error code)", ("mode", "status")),
    MetricSpec("budgetdiff_images", "counter", "images generated, by mode and auto route", ("mode", "route")),
    MetricSpec("budgetdiff_request_latency_ms", "histogram", "model-side latency of one API call (queue + "
               "generation of all its images), ms", ("mode",), tuple(LATENCY_MS_BUCKETS)),
    MetricSpec("budgetdiff_queue_wait_ms", "histogram", "time an image waited before its generation started (step "
               "batching: admission into the denoising pool; request batching: its batch's start), ms",
               ("mode",), tuple(LATENCY_MS_BUCKETS)),
    MetricSpec("budgetdiff_steps", "histogram", "denoising steps per image", ("mode",), tuple(STEP_BUCKETS)),
    MetricSpec("budgetdiff_nfe", "histogram", "UNet evaluations per image (a CFG pair counts once)", ("mode",),
               tuple(STEP_BUCKETS)),
    MetricSpec("budgetdiff_skip_ratio", "histogram", "share of steps whose noise prediction was reused",
               ("mode",), tuple(RATIO_BUCKETS)),
    MetricSpec("budgetdiff_unet_gflops", "counter", "UNet GFLOPs spent, by mode", ("mode",)),
    MetricSpec("budgetdiff_batch_images", "histogram", "images in one batched generation call (step batching: "
               "in one UNet call; request batching: in one @serve.batch call)", (), tuple(BATCH_BUCKETS)),
    MetricSpec("budgetdiff_unet_call_rows", "histogram", "rows in one UNet call of the step scheduler (a guided "
               "image takes 2), by model", ("model",), tuple(ROW_BUCKETS)),
    MetricSpec("budgetdiff_inflight_images", "gauge", "images denoising in this replica's step scheduler"),
    MetricSpec("budgetdiff_step_queue_delay_ms", "histogram", "time a call waited in the replica's step "
               "scheduler before its images joined the denoising pool, ms", ("mode",), tuple(LATENCY_MS_BUCKETS)),
    MetricSpec("budgetdiff_predicted_quality", "histogram", "the budget predictor's predicted quality at the "
               "chosen steps (lowest level), per image", ("mode",), tuple(QUALITY_BUCKETS)),
    MetricSpec("budgetdiff_queue_depth", "gauge", "images accepted by this replica and not yet generated"),
    MetricSpec("budgetdiff_model_info", "gauge", "1 for the model version this replica serves",
               ("model_version",)),
    # --- shadow evaluation ------------------------------------------------------------------------
    MetricSpec("budgetdiff_shadow_sampled", "counter", "served images sampled for shadow evaluation, by "
               "outcome: queued, or dropped because the shadow queue was full", ("outcome",)),
    MetricSpec("budgetdiff_shadow_evaluations", "counter", "shadow-evaluated images by mode and SLO verdict "
               "(good: realised quality reached the request's quality target)", ("mode", "slo")),
    MetricSpec("budgetdiff_shadow_errors", "counter", "shadow evaluations that failed", ()),
    MetricSpec("budgetdiff_shadow_queue_depth", "gauge", "images waiting in the shadow queue"),
    MetricSpec("budgetdiff_shadow_last_eval_timestamp_seconds", "gauge",
               "unix time of the last finished shadow evaluation (liveness)"),
    MetricSpec("budgetdiff_realised_quality", "histogram", "realised quality of a served image against the "
               "reference-step image (lowest of SSIM, 1-LPIPS, I-CLIP)", ("mode",), tuple(QUALITY_BUCKETS)),
    MetricSpec("budgetdiff_quality_shortfall", "histogram", "quality target minus realised quality, for "
               "images that missed their target", ("mode",), tuple(RATIO_BUCKETS)),
    MetricSpec("budgetdiff_shadow_score", "gauge", "mean of each metric level over the last shadow window "
               "(served image vs reference, or vs the prompt for CLIP-T and attr_acc)", ("metric",)),
    # --- drift -------------------------------------------------------------------------------------
    MetricSpec("budgetdiff_drift_mmd_pvalue", "gauge", "kernel-MMD permutation p-value of the last window of "
               "served prompt embeddings vs the budget predictor's training prompts"),
    MetricSpec("budgetdiff_drift_c2st_pvalue", "gauge", "classifier two-sample test p-value, same window"),
    MetricSpec("budgetdiff_drift_c2st_auc", "gauge", "held-out AUC of the two-sample classifier (0.5: no drift)"),
    MetricSpec("budgetdiff_drift_window_prompts", "gauge", "served prompts in the last drift window"),
)

BY_NAME = {s.name: s for s in SPECS}


def exported_names() -> set[str]:
    """Every series name the service's own metrics produce in Prometheus."""
    return {series for spec in SPECS for series in spec.series()}


# Built-in Ray Serve series the rules and dashboard also use (PLATFORM.md lists them).
RAY_SERVE_SERIES = {
    "ray_serve_num_http_requests_total", "ray_serve_num_http_error_requests_total",
    "ray_serve_http_request_latency_ms_bucket", "ray_serve_http_request_latency_ms_count",
    "ray_serve_http_request_latency_ms_sum", "ray_serve_deployment_queued_queries",
    "ray_serve_deployment_replica_healthy", "ray_serve_actual_batch_size_bucket",
    "ray_serve_num_deployment_http_error_requests_total", "ray_serve_replica_processing_queries",
}
