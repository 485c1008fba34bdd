"""Screenshots of the MLflow UI after a pipeline run (issue 17), through headless Chromium's DevTools
protocol. Called by scripts/mlflow_screenshots.sh, which starts and stops the MLflow server.

    .venv/bin/python scripts/mlflow_screenshots.py http://127.0.0.1:PORT EXPERIMENT OUT_DIR

The runs table of MLflow 3.17 keeps its columns, expanded parents and the assistant panel in the
browser's localStorage, not in the URL, and a fresh browser shows none of the metrics. So the script
opens the server's origin, writes the state a person would set by hand (the newest pipeline run
expanded; H, base and new accuracy, their std and the distinguishing params as columns; the
assistant closed), then loads the pages and captures them:
  runs.png     the experiment's runs table, the newest pipeline run expanded
  compare.png  the compare view of that run's per-method "mean of N seeds" runs
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import websockets

WINDOW = (2200, 1300)
SETTLE_S = 12.0  # the single-page app fetches runs and draws after load
METRICS = ("base2new/aape/H_mean", "H", "H_std", "base_accuracy", "new_accuracy")  # the parent's headline, then the method runs'
PARAMS = ("method", "dataset", "seed", "lambda_distill", "aggregator", "backbone")


def rest(url: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request))


def newest_pipeline(url: str, experiment: str) -> tuple[str, str, list[str]]:
    """(experiment id, newest top-level run id, its children's "mean of" run ids)."""
    exp = rest(url, "/api/2.0/mlflow/experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": experiment}))["experiment"]
    runs = rest(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000,
                                                     "order_by": ["attributes.start_time DESC"]}).get("runs", [])
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    top = [run_id for run_id in tags if "mlflow.parentRunId" not in tags[run_id]]
    if not top:
        raise SystemExit(f"experiment {experiment} has no runs: run `bash scripts/demo.sh` first")
    parent = top[0]
    means = [run_id for run_id, t in tags.items() if t.get("mlflow.parentRunId") == parent and "aggregate" in t]
    return exp["experiment_id"], parent, means


def ui_state(experiment_id: str, parent: str) -> dict[str, str]:
    """localStorage entries: the runs table's columns and expanded parent, the assistant closed."""
    columns = [f"metrics.`{m}`" for m in METRICS] + [f"params.`{p}`" for p in PARAMS]
    table = {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
             "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
             "selectedColumns": columns, "columnOrder": [], "columnWidths": {}, "runsExpanded": {parent: True},
             "runsPinned": [], "runsHidden": [], "runsVisibilityMap": {}, "runsHiddenMode": "SHOW_ALL"}
    return {
        f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState': json.dumps(table),
        "mlflow.assistant.panelOpen_v1": "false",
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
    }


class Chromium:
    """Headless Chromium on a free local port, driven over its DevTools websocket."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.profile = tempfile.TemporaryDirectory(prefix="aape-chromium-")
        self.process = subprocess.Popen(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--remote-debugging-port={self.port}",
             "--remote-debugging-address=127.0.0.1", f"--user-data-dir={self.profile.name}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.calls = 0

    async def __aenter__(self) -> "Chromium":
        for _ in range(200):
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json"))
                page = next(t for t in targets if t["type"] == "page")
                break
            except (OSError, StopIteration):
                await asyncio.sleep(0.1)
        else:
            raise SystemExit("headless Chromium did not start")
        self.socket = await websockets.connect(page["webSocketDebuggerUrl"], max_size=2**28)
        await self.call("Page.enable")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.socket.close()
        self.process.terminate()
        self.process.wait()
        self.profile.cleanup()

    async def call(self, method: str, **params):
        self.calls += 1
        call_id = self.calls
        await self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.socket.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def open(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await asyncio.sleep(SETTLE_S)

    async def run_js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def capture(self, path: Path) -> None:
        path.write_bytes(base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"]))
        print(f"  {path}")


async def shoot(url: str, experiment: str, out: Path) -> None:
    experiment_id, parent, means = newest_pipeline(url, experiment)
    print(f"==> screenshots of {url} (experiment {experiment}, id {experiment_id}; pipeline run {parent}, {len(means)} mean-of-seeds runs)")
    out.mkdir(parents=True, exist_ok=True)
    async with Chromium() as browser:
        await browser.call("Page.navigate", url=url + "/health")  # same origin: its localStorage is the UI's
        await asyncio.sleep(1.0)
        for key, value in ui_state(experiment_id, parent).items():
            await browser.run_js(f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")
        # workflowType: MLflow 3.17's UI has a global GenAI / Model training switch that the
        # experiment's kind tag does not set; the URL parameter does
        await browser.open(f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
        await browser.capture(out / "mlflow-runs.png")
        compare = urllib.parse.urlencode({"runs": json.dumps(means), "experiments": json.dumps([experiment_id])})
        await browser.open(f"{url}/#/compare-runs?{compare}&workflowType=machine_learning")
        await browser.capture(out / "mlflow-compare.png")


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__)
        return 2
    started = time.perf_counter()
    asyncio.run(shoot(sys.argv[1].rstrip("/"), sys.argv[2], Path(sys.argv[3])))
    print(f"done in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
