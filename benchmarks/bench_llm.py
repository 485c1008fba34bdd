"""Benchmark: descriptions per second from an OpenAI-compatible server with a fixed 200 ms latency.

Runs the real `generate-prompts` stage against the stub server (tests/llm_stub_server.py, started as
a separate process so it does not share this process's GIL) at concurrency 1, 8 and 64, each with a
fresh journal, and prints the rate beside the ideal (concurrency / latency). Then reruns the
concurrency-64 setting with everything in the journal and reports what that rerun costs.

Targets: at concurrency 64, at least half the ideal rate; a fully cached rerun sends no request.

    .venv/bin/python benchmarks/bench_llm.py [--latency 0.2] [--waves 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import aape.prompts.openai_source  # noqa: E402,F401 - imported up front so no level pays for the import
from aape.config import load_params  # noqa: E402
from aape.stages.generate_prompts import run  # noqa: E402

LEVELS = (1, 8, 64)
TARGET_FRACTION = 0.5


def start_stub(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests" / "llm_stub_server.py"), "--port", "0", "--latency", str(latency)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()  # "stub chat-completions server at http://127.0.0.1:PORT/v1 (...)"
    if "http://" not in line:
        proc.kill()
        raise RuntimeError(f"stub server did not start: {line!r}")
    return proc, line.split(" at ")[1].split()[0]


def server_stats(base_url: str) -> dict:
    with urllib.request.urlopen(base_url + "/stats", timeout=5) as reply:
        return json.loads(reply.read())


def stage_params(workdir: Path, base_url: str, concurrency: int, answers_per_class: int):
    data = workdir / "out" / "data"
    data.mkdir(parents=True, exist_ok=True)
    classes = [f"class number {i}" for i in range(concurrency)]
    (data / "classes.json").write_text(json.dumps({"dataset": "bench", "classnames": classes}))
    return load_params(None, [
        f"run.output_dir={workdir / 'out'}", f"run.cache_dir={workdir / 'cache'}", "tracking.enabled=false",
        "prompts.source=openai", f"prompts.openai.base_url={base_url}", "prompts.openai.api_key_env=AAPE_BENCH_KEY",
        "prompts.openai.model=stub-model", f"prompts.openai.concurrency={concurrency}", "prompts.templates=generic",
        "prompts.max_templates=2", f"prompts.n_per_template={answers_per_class // 2}",
    ])  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2, help="server reply latency in seconds")
    parser.add_argument("--waves", type=int, default=8, help="answers per class (= rounds of `concurrency` requests)")
    args = parser.parse_args()
    logging.getLogger("aape").setLevel(logging.WARNING)
    os.environ["AAPE_BENCH_KEY"] = "bench-key"
    proc, base_url = start_stub(args.latency)
    results, passed = [], True
    try:
        with tempfile.TemporaryDirectory(prefix="aape-bench-llm-") as tmp:
            for level in LEVELS:
                params = stage_params(Path(tmp) / f"c{level}", base_url, level, args.waves)
                start = time.perf_counter()
                out = run(params)
                seconds = time.perf_counter() - start
                rate, ideal = out["descriptions"] / seconds, level / args.latency
                results.append((level, out["descriptions"], out["requests_sent"], seconds, rate, ideal))

            before = server_stats(base_url)["received"]
            start = time.perf_counter()
            rerun = run(params)  # the concurrency-64 setting again: everything is in its journal
            rerun_seconds = time.perf_counter() - start
            rerun_sent = server_stats(base_url)["received"] - before
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    print(f"LLM request throughput against a stub server with {args.latency * 1000:.0f} ms latency (stage generate-prompts, end to end)")
    print(f"{'concurrency':>11} {'answers':>8} {'requests':>9} {'seconds':>8} {'answers/s':>10} {'ideal/s':>8} {'of ideal':>9}")
    for level, answers, sent, seconds, rate, ideal in results:
        print(f"{level:>11} {answers:>8} {sent:>9} {seconds:>8.2f} {rate:>10.1f} {ideal:>8.1f} {rate / ideal:>8.0%}")
    level, _, _, _, rate, ideal = results[-1]
    ok = rate / ideal >= TARGET_FRACTION
    passed &= ok
    print(f"target: at concurrency {level}, >= {TARGET_FRACTION:.0%} of ideal: {rate / ideal:.0%} -> {'PASS' if ok else 'FAIL'}")
    ok = rerun_sent == 0 and rerun["requests_sent"] == 0 and rerun["descriptions"] == results[-1][1]
    passed &= ok
    print(
        f"cached rerun ({rerun['answers_from_journal']} answers from the journal): {rerun_seconds:.3f} s, "
        f"{rerun_sent} requests reached the server, {rerun['tokens_this_run']} tokens, ${rerun['estimated_cost_usd']:.4f} "
        f"-> {'PASS' if ok else 'FAIL'} (target: no request sent)"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
