"""Monitoring of the image service: Prometheus metrics exported from the Serve replicas
(``metrics``), shadow evaluation of served images and the per-request quality SLO (``shadow``),
prompt drift (``drift``), the Prometheus controller, alert rules and Grafana dashboard
(``prom``, ``prometheus/``, ``grafana/``). See docs/monitoring.md.

``budgetdiff/`` never imports this package; ``serving/`` does.
"""
