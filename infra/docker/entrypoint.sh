#!/usr/bin/env bash
# The GPU image's entrypoint (infra/docker/Dockerfile), and the command of the GPU worker pods'
# init container `fetch-model` (infra/k8s/rayservice.yaml, rendered by `python -m infra.render`).
#
# When BUDGETDIFF_MODEL_SOURCE is an MLflow registry URI (models:/budgetdiff@champion,
# models:/budgetdiff/7), the version is fetched from MLFLOW_TRACKING_URI into BUDGETDIFF_BUNDLE_DIR
# (python -m registry fetch, i.e. registry.resolve.fetch: downloads the version, puts back the
# frozen parts it references, checks every file against its manifest, renames the directory into
# place; nothing is fetched when the directory already holds that version). Anything else in
# BUDGETDIFF_MODEL_SOURCE, or nothing, fetches nothing: the serve config's model_source is used as
# it is (the embedded bundle is part of the image). Then the arguments, if any, are exec'd (e.g.
# `ray start --head ... --block`); with none (the init container) it exits after the fetch.
# A failed fetch exits non-zero before anything else starts.
set -euo pipefail

python_bin="${BUDGETDIFF_PYTHON:-python}"
source_uri="${BUDGETDIFF_MODEL_SOURCE:-}"

case "$source_uri" in
  models:/*)
    if [[ -z "${BUDGETDIFF_BUNDLE_DIR:-}" ]]; then
      echo "entrypoint: BUDGETDIFF_BUNDLE_DIR: set it to the directory the serve config's model_source names" >&2
      exit 2
    fi
    if [[ -z "${MLFLOW_TRACKING_URI:-}" ]]; then
      echo "entrypoint: MLFLOW_TRACKING_URI: set it to the MLflow server that holds $source_uri" >&2
      exit 2
    fi
    echo "entrypoint: fetching $source_uri from $MLFLOW_TRACKING_URI into $BUDGETDIFF_BUNDLE_DIR" >&2
    "$python_bin" -m registry fetch "$source_uri" --out "$BUDGETDIFF_BUNDLE_DIR"
    ;;
  "")
    ;;
  *)
    echo "entrypoint: BUDGETDIFF_MODEL_SOURCE=$source_uri is not a models:/ URI; nothing to fetch" >&2
    ;;
esac

if (( $# > 0 )); then
  exec "$@"
fi
