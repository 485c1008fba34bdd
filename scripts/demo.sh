#!/usr/bin/env bash
# Command 1 of the README: set up, then run the whole pipeline on the embedded defaults through a
# local Prefect server and `prefect deployment run`, with MLflow on SQLite and DVC's local remote.
# Everything this script starts, it stops. Servers listen on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
bash scripts/setup.sh
export PATH="$ROOT/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1
export PREFECT_HOME="$ROOT/.prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_LOGGING_EXTRA_LOGGERS=aape
mkdir -p "$PREFECT_HOME"

PORT=${AAPE_PREFECT_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
pids=()
cleanup() {
  # newest first: the deployment server must stop while the Prefect API it talks to is still up
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
}
trap cleanup EXIT INT TERM

echo "==> starting a local Prefect server on 127.0.0.1:$PORT (SQLite in .prefect/, log .prefect/server.log)"
prefect server start --host 127.0.0.1 --port "$PORT" > "$PREFECT_HOME/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 120); do
  curl -fs "$PREFECT_API_URL/health" > /dev/null 2>&1 && break
  kill -0 "${pids[0]}" 2>/dev/null || { echo "Prefect server exited; see $PREFECT_HOME/server.log" >&2; tail -20 "$PREFECT_HOME/server.log" >&2; exit 1; }
  sleep 1
done
curl -fs "$PREFECT_API_URL/health" > /dev/null || { echo "Prefect server did not become healthy; see $PREFECT_HOME/server.log" >&2; exit 1; }

echo "==> serving the deployments 'aape-pipeline/local', 'aape-sweep/local' and 'aape-experiment/local' (log .prefect/serve.log)"
python -m flows.serve > "$PREFECT_HOME/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 120); do
  prefect deployment inspect 'aape-pipeline/local' > /dev/null 2>&1 && break
  kill -0 "${pids[1]}" 2>/dev/null || { echo "flows.serve exited; see $PREFECT_HOME/serve.log" >&2; tail -20 "$PREFECT_HOME/serve.log" >&2; exit 1; }
  sleep 1
done

echo "==> prefect deployment run 'aape-pipeline/local' --watch"
status=0
prefect deployment run 'aape-pipeline/local' --watch --watch-interval 5 || status=$?
if [ "$status" -ne 0 ]; then
  echo "The pipeline run failed (exit $status). Its logs: $PREFECT_HOME/serve.log" >&2
  tail -40 "$PREFECT_HOME/serve.log" >&2
  exit "$status"
fi

OUT=$(python -c 'from aape.config import load_params; print(load_params().run.output_dir)')
echo
echo "================================ results ================================"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
report = out / "eval" / "report.md"
print("\n".join(report.read_text().splitlines()[:40]))
PY
echo
echo "Report:        $ROOT/$OUT/eval/report.md  (plots in $ROOT/$OUT/eval/plots/)"
echo "Metrics (DVC): $ROOT/$OUT/eval/metrics.json   ->  dvc metrics show; dvc status (clean after this run)"
echo "MLflow UI:     .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000"
echo "               then http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning (the runs, not the GenAI overview)"
echo "Prefect UI:    PREFECT_HOME=.prefect .venv/bin/prefect server start --host 127.0.0.1   (the run history is kept)"
echo "Rerun via DVC: source .venv/bin/activate && dvc repro   (nothing to do right after this run)"
