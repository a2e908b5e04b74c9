# Set-up and the two main jobs. Everything goes through uv and the committed uv.lock;
# uv itself is installed into .tools/ when it is not on PATH.
SHELL := /bin/bash
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export UV_PYTHON_DOWNLOADS := never

UV := $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.tools/bin/uv)
TEST_ARGS ?=

.PHONY: setup setup-system repro test test-all tiny clean-env

$(CURDIR)/.tools/bin/uv:
	python3 -m pip install --quiet --disable-pip-version-check --target $(CURDIR)/.tools uv

setup: $(UV)
	$(UV) sync --frozen

# System packages the tests drive for real: Debian's chromium + chromium-driver (the playground's
# browser test). Installed with apt-get (root, as here and in CI) only when missing.
setup-system:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

repro: setup  ## the default workflow: dvc repro on the embedded model
	$(UV) run --frozen dvc repro

test: setup setup-system  ## the default test run (slow tests excluded)
	$(UV) run --frozen pytest -m "not slow" --durations=15 $(TEST_ARGS)

test-all: setup setup-system
	$(UV) run --frozen pytest $(TEST_ARGS)

tiny: setup  ## the tiny profile of the whole workflow, as CI runs it
	$(UV) run --frozen pytest tests/test_workflow.py

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
