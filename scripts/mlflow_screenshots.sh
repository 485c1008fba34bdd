#!/usr/bin/env bash
# Screenshots of the MLflow UI after a run (issue 17): the experiment's runs table and the compare
# view of the per-method "mean of N seeds" runs, taken with headless Chromium from Debian's packages
# (apt-get install chromium). Run after `bash scripts/demo.sh`; writes docs/screenshots/*.png.
# It starts an MLflow server on 127.0.0.1 and stops it on exit.
#
#   bash scripts/mlflow_screenshots.sh [sqlite:///mlflow.db] [experiment name]
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-sqlite:///mlflow.db}
EXPERIMENT=${2:-aape}
OUT=docs/screenshots
command -v chromium > /dev/null || { echo "chromium not found: apt-get install chromium" >&2; exit 1; }
mkdir -p "$OUT"
PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
.venv/bin/mlflow server --backend-store-uri "$STORE" --host 127.0.0.1 --port "$PORT" > /tmp/aape-mlflow-ui.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 90); do curl -fs "$URL/health" > /dev/null 2>&1 && break; sleep 1; done
curl -fs "$URL/health" > /dev/null || { echo "MLflow server did not start; see /tmp/aape-mlflow-ui.log" >&2; exit 1; }

# the runs table's columns and expanded rows live in the browser's localStorage, so the pictures are
# taken through Chromium's DevTools protocol, which sets them first (scripts/mlflow_screenshots.py)
.venv/bin/python scripts/mlflow_screenshots.py "$URL" "$EXPERIMENT" "$OUT"
