# Set-up and the two main jobs. Everything goes through uv and the committed uv.lock;
# uv itself is installed into .tools/ when it is not on PATH.
SHELL := /bin/bash
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export UV_PYTHON_DOWNLOADS := never

UV := $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.tools/bin/uv)
TEST_ARGS ?=

.PHONY: setup setup-system repro test test-fast test-workflow test-all tiny clean-env

$(CURDIR)/.tools/bin/uv:
	python3 -m pip install --quiet --disable-pip-version-check --target $(CURDIR)/.tools uv

setup: $(UV)
	$(UV) sync --frozen

# System packages the tests drive for real: Debian's chromium + chromium-driver (the playground's
# browser test) and prometheus (prometheus + promtool: make monitor, the rules tests). Installed with
# apt-get (root, as here and in CI) only when missing; the packaged prometheus.service (:9090) is
# not wanted (make monitor runs its own on :9095), so it is disabled where systemd runs.
setup-system:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
	    && { systemctl disable --now prometheus >/dev/null 2>&1 || true; }; }

repro: setup  ## the default workflow: dvc repro on the embedded model
	$(UV) run --frozen dvc repro

test: test-fast test-integration test-workflow  ## the default test run: fast tests, Ray Tune runs, tiny workflow (no slow ones)

test-fast: setup setup-system  ## every fast test (no slow ones, not the Ray Tune runs, not the tiny dvc repro)
	$(UV) run --frozen pytest -m "not slow and not workflow and not integration" --durations=15 $(TEST_ARGS)

test-integration: setup  ## the Ray Tune runs on a private Ray (tests/test_tune_skip.py)
	$(UV) run --frozen pytest -m "integration and not slow" --durations=15 $(TEST_ARGS)

test-workflow: setup  ## the tiny profile of the whole workflow (dvc repro on params.tiny.yaml), as CI runs it
	$(UV) run --frozen pytest -m "workflow and not slow" --durations=15 $(TEST_ARGS)

test-all: setup setup-system
	$(UV) run --frozen pytest $(TEST_ARGS)

tiny: test-workflow

clean-env:
	rm -rf .venv .tools

# --- MLflow tracking server (docs/registry.md): sqlite backend, local artifact root -----------------
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_WORKERS ?= 1
MLFLOW_DB ?= $(CURDIR)/mlflow.db
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlartifacts
MLFLOW_PID_FILE ?= $(CURDIR)/logs/mlflow-server.pid

.PHONY: mlflow-server mlflow-server-stop

mlflow-server: setup  ## start mlflow server in the background; ready once /health answers
	$(UV) run --frozen python -m registry.server start --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) \
		--db $(MLFLOW_DB) --artifacts $(MLFLOW_ARTIFACTS) --workers $(MLFLOW_WORKERS) --pid-file $(MLFLOW_PID_FILE)

mlflow-server-stop:
	$(UV) run --frozen python -m registry.server stop --pid-file $(MLFLOW_PID_FILE)

# --- The Ray Serve service (serving/, docs/serving.md) ---------------------------------------------
.PHONY: serve serve-stop serve-status setup-system-serving
SERVE_CONFIG ?= serving/configs/cpu.yaml
SERVE_TEMP_DIR ?= /tmp/bdserve
SERVE_ARGS ?=

serve: setup  ## start a private Ray head on 127.0.0.1, deploy $(SERVE_CONFIG), print the URL
	$(UV) run --frozen python -m serving start --config $(SERVE_CONFIG) --temp-dir $(SERVE_TEMP_DIR) $(SERVE_ARGS)

serve-stop:  ## shut the service down and end that Ray cluster's processes (only those)
	$(UV) run --frozen python -m serving stop --temp-dir $(SERVE_TEMP_DIR)

serve-status:
	$(UV) run --frozen python -m serving status --temp-dir $(SERVE_TEMP_DIR)

setup-system-serving: setup-system  ## (root) headless chromium + chromedriver for the playground browser test

# --- Prometheus for the local service (monitoring/, docs/monitoring.md) ----------------------------
.PHONY: monitor monitor-stop monitor-status monitor-check
MONITOR_LISTEN ?= 127.0.0.1:9095
MONITOR_SCRAPE_INTERVAL ?= 15s
MONITOR_DIR ?= $(CURDIR)/logs/prometheus
MONITOR_ARGS ?=

monitor: setup  ## start Prometheus in the background, scraping the cluster of make serve ($(SERVE_TEMP_DIR)); print the URL
	$(UV) run --frozen python -m monitoring.prom start --temp-dir $(SERVE_TEMP_DIR) --listen $(MONITOR_LISTEN) \
		--scrape-interval $(MONITOR_SCRAPE_INTERVAL) --dir $(MONITOR_DIR) $(MONITOR_ARGS)

monitor-stop:  ## stop the Prometheus that make monitor started (by its pid file, only that one)
	$(UV) run --frozen python -m monitoring.prom stop --dir $(MONITOR_DIR)

monitor-status:
	$(UV) run --frozen python -m monitoring.prom status --dir $(MONITOR_DIR)

monitor-check: setup  ## promtool: check the generated config, check the rules, run the rules' unit tests
	@command -v promtool >/dev/null || { echo "promtool: not installed; run make setup-system" >&2; exit 1; }
	@mkdir -p $(MONITOR_DIR)
	$(UV) run --frozen python -m monitoring.prom config --temp-dir $(SERVE_TEMP_DIR) --listen $(MONITOR_LISTEN) \
		--scrape-interval $(MONITOR_SCRAPE_INTERVAL) --out $(MONITOR_DIR)/prometheus.check.yml
	promtool check config $(MONITOR_DIR)/prometheus.check.yml
	promtool check rules monitoring/prometheus/rules.yml
	cd monitoring/prometheus && promtool test rules rules_test.yml

# --- Kubernetes manifests (infra/, docs/kubernetes.md): rendered from serving/configs/gpu.yaml ------
.PHONY: manifests manifests-check
manifests: setup  ## regenerate infra/k8s/ (RayService + PodMonitor) from serving/configs/gpu.yaml
	$(UV) run --frozen python -m infra.render

manifests-check: setup  ## fail when infra/k8s/ differs from a fresh render
	$(UV) run --frozen python -m infra.render --check
