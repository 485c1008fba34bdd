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

# what to show, read through the REST API: the experiment and its newest parent's "mean of" runs
read -r EXP_ID COMPARE < <(URL="$URL" EXPERIMENT="$EXPERIMENT" .venv/bin/python - <<'EOF'
import json, os, urllib.parse, urllib.request

url, name = os.environ["URL"], os.environ["EXPERIMENT"]
def call(path, body=None):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))
exp = call("/api/2.0/mlflow/experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": name}))["experiment"]
runs = call("/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 500,
                                            "order_by": ["attributes.start_time DESC"]}).get("runs", [])
means = [r["info"]["run_id"] for r in runs if any(t["key"] == "aggregate" for t in r["data"].get("tags", []))]
parent_of = {r["info"]["run_id"]: next((t["value"] for t in r["data"].get("tags", []) if t["key"] == "mlflow.parentRunId"), None) for r in runs}
# the newest evaluation's aggregate runs only (they share one stage run as parent)
newest = [m for m in means if parent_of[m] == parent_of[means[0]]] if means else []
compare = "#/compare-runs?" + urllib.parse.urlencode({"runs": json.dumps(newest), "experiments": json.dumps([exp["experiment_id"]])})
print(exp["experiment_id"], compare)
EOF
)
shoot() {  # url, file: the SPA needs virtual time to fetch and draw
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=2200,1000 \
    --virtual-time-budget=20000 --screenshot="$2" "$1" > /dev/null 2>&1
  echo "  $2"
}
echo "==> screenshots of $URL (experiment $EXPERIMENT, id $EXP_ID)"
# workflowType: MLflow 3.17's UI keeps a global GenAI / Model training switch (browser storage,
# GenAI by default) that the experiment's kind tag does not set; the URL parameter does
shoot "$URL/#/experiments/$EXP_ID/runs?workflowType=machine_learning" "$OUT/mlflow-runs.png"
shoot "$URL/$COMPARE&workflowType=machine_learning" "$OUT/mlflow-compare.png"
