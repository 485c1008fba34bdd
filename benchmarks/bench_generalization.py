"""Proxy benchmark of generalisation: does AAPE beat zero-shot CLIP on new classes?

    .venv/bin/python benchmarks/bench_generalization.py [--presets clip-like,hard-domain,...]
        [--seeds 1,2,3] [--variants attention,literal,mean,mlp,random] [--epochs N] [--jobs 2]
        [--markdown FILE]

No CLIP weights can be had here, so the paper's claims are tested on SYNTHETIC embeddings that
behave like CLIP's (aape/synthetic/world.py: modality gap, weak class-name prompts, related
classes, shared visual sub-modes, descriptions of mixed quality; docs/method.md, "The proxy
benchmark"). Every method is trained exactly as the pipeline trains it on cached features, with the
pipeline's defaults (params.yaml's schema defaults; epochs by CoOp's rule unless --epochs).

Per preset: base / new accuracy and H (mean over seeds; H of the mean B and N, as the paper
reports), the diagnostics, and PASS/FAIL for every target of aape.synthetic.proxy.TARGETS.
Exits 1 when any target fails. `--markdown` writes the tables for the README and docs/method.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aape.method.aggregator import VARIANTS  # noqa: E402
from aape.synthetic.proxy import BASELINES, TARGETS, WorldResult, aape_method, check_targets, mean_rows, run_world  # noqa: E402
from aape.synthetic.world import PRESETS, SYNTHETIC_NOTICE, preset  # noqa: E402


LARGE_PRESET_CLASSES = 200


def _job(args: tuple[str, int, tuple[str, ...], int | None]) -> WorldResult:
    import torch

    torch.set_num_threads(1)  # one job per core: tiny models lose more to thread sync than they gain
    name, seed, variants, epochs = args
    return run_world(preset(name), seed, variants, epochs=epochs)


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.1f}"


def _method_order(variants: tuple[str, ...]) -> list[str]:
    return [*BASELINES[:3], "aape-nodistill", *(aape_method(v) for v in variants)]


def preset_report(name: str, results: list[WorldResult], variants: tuple[str, ...]) -> tuple[list[str], bool]:
    rows = mean_rows(results)
    def std(values: list[float]) -> float:
        finite = [v for v in values if v == v]
        return statistics.pstdev(finite) if len(finite) > 1 else float("nan")

    spread = {m: std([r.rows[m].H for r in results]) for m in rows}
    lines = [f"### {name}: {PRESETS[name].summary}", "", f"seeds {', '.join(str(r.seed) for r in results)}; mean of seeds", ""]
    lines += ["| method | base | new | H | H std | diagnostics |", "|---|---|---|---|---|---|"]
    for method in _method_order(variants):
        row = rows[method]
        diag = ", ".join(f"{k} {v:.3g}" for k, v in sorted(row.extra.items()) if k in _SHOWN)
        lines.append(f"| {method} | {_fmt(row.base)} | {_fmt(row.new)} | {_fmt(row.H)} | {_fmt(spread[method])} | {diag} |")
    lines += ["", "| target | measured | threshold | verdict |", "|---|---|---|---|"]
    passed = True
    for target, measured, threshold, ok in check_targets(name, rows):
        passed &= ok
        lines.append(f"| {target} | {measured:.3f} | {threshold:.3f} | {'PASS' if ok else 'FAIL'} |")
    return lines, passed


_SHOWN = ("attention_focus", "attention_entropy", "distill_ratio", "summary_shift", "C")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--large-variants", default="attention",
        help=f"aggregator variants on presets with more than {LARGE_PRESET_CLASSES} base classes (each costs minutes there)",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, default=None, help="override CoOp's epoch rule (quick looks only)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    presets = [p for p in args.presets.split(",") if p]
    for name in presets:
        preset(name)  # unknown names fail before any work
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = tuple(v for v in args.variants.split(",") if v)
    large_variants = tuple(v for v in args.large_variants.split(",") if v)
    if "attention" not in variants or "attention" not in large_variants:
        parser.error("--variants and --large-variants must include 'attention' (the default variant, which the targets are about)")
    variants_of = {n: large_variants if preset(n).base_classes > LARGE_PRESET_CLASSES else variants for n in presets}
    print(f"*** {SYNTHETIC_NOTICE} ***")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {args.jobs} jobs; presets {presets}; seeds {seeds}")
    started = time.perf_counter()
    # the longest jobs first, so that both workers stay busy to the end
    jobs = sorted(((n, s, variants_of[n], args.epochs) for n in presets for s in seeds), key=lambda j: -preset(j[0]).base_classes)
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.map(_job, jobs, chunksize=1)
    raw = Path(args.markdown or "bench_generalization.md").with_suffix(".json")
    raw.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))  # before any reporting can fail
    print(f"raw results in {raw}")
    out = [f"*{SYNTHETIC_NOTICE}.*", ""]
    all_passed = True
    for name in presets:
        mine = [r for r in results if r.preset == name]
        lines, passed = preset_report(name, mine, variants_of[name])
        all_passed &= passed
        out += lines + ["", f"{name}: {sum(r.seconds for r in mine):.0f} s of compute over {len(mine)} worlds", ""]
    epochs_note = f"--epochs {args.epochs}" if args.epochs else "CoOp's epoch rule"
    out.append(f"Wall time {time.perf_counter() - started:.0f} s; schedules: the pipeline's defaults, {epochs_note}.")
    out.append(f"OVERALL: {'PASS' if all_passed else 'FAIL'} ({len(TARGETS)} targets per preset where they apply)")
    text = "\n".join(out)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
        print(f"tables written to {args.markdown}")
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
