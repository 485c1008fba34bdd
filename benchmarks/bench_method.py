"""Benchmark of the AAPE method on synthetic features (d = 512, no CLIP needed).

    .venv/bin/python benchmarks/bench_method.py [--threads N (default 1)] [--quick]

1. Stage 3 (generator distillation) seconds per epoch, 16 shots x 1000 classes (ImageNet-sized),
   training and validation (4 shots per class) included.
2. Fast head vs naive head (the [B, C, 2d] concatenation), 1000 classes x batch 32: time and peak
   memory side by side, inference and training step. Target: fast >= 20x faster (default head).
3. A 200-epoch 16-shot training of a 10-class dataset (CoOp schedule, batch 32). Target: < 60 s.
   The aggregator's 200 epochs on the same data (50 descriptions per class) are reported beside it.

Peak memory is the rise of the process's peak resident set during the call (Linux /proc; the peak
is reset before each measurement), so it counts every temporary, forward and backward.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from aape.config import ScheduleConfig  # noqa: E402
from aape.method import AAPEModel, build_aggregator, compute_summaries, seeded, train_aggregator, train_generator  # noqa: E402
from aape.method.synthetic import make_world  # noqa: E402

HEAD_SPEEDUP_TARGET = 20.0
SMALL_TRAINING_TARGET_S = 60.0


def _proc_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_memory_mb(fn: Callable[[], object]) -> float | None:
    """Rise of the peak resident set while fn runs (None where /proc is unavailable)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
    except OSError:
        fn()
        return None
    base = _proc_bytes("VmRSS:")
    fn()
    peak = _proc_bytes("VmHWM:")
    return None if base is None or peak is None else (peak - base) / 1e6


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (allocator, lazy init)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def bench_stage3_epoch(classes: int, shots: int, epochs: int) -> float:
    world = make_world(classes=classes, dim=512, shots=shots, views=2, val_shots=4, relevant=2, irrelevant=2, seed=0)
    targets = world.data.views.clone()  # stand-in summaries: the cost does not depend on their values
    with seeded(1):
        model = AAPEModel(512, logit_scale=100.0)
    result = train_generator(model, world.data, world.class_text, targets, 5.0, ScheduleConfig(epochs=epochs), epochs, seed=1)
    return statistics.mean(r["seconds"] for r in result.history)


def bench_head(kind: str, repeats: int) -> dict[str, float | None]:
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(32, 512, generator=gen), dim=-1)
    w = F.normalize(torch.randn(1000, 512, generator=gen), dim=-1)
    with seeded(0):
        model = AAPEModel(512, head=kind)
    assert torch.allclose(model.logits(x, w), model.naive_logits(x, w), atol=1e-3)

    def infer(naive: bool) -> Callable[[], object]:
        def run():
            with torch.no_grad():
                return (model.naive_logits if naive else model.logits)(x, w)

        return run

    def train_step(naive: bool) -> Callable[[], object]:
        def run():
            model.zero_grad(set_to_none=True)
            (model.naive_logits if naive else model.logits)(x, w).logsumexp(-1).mean().backward()

        return run

    out: dict[str, float | None] = {}
    for label, make in (("infer", infer), ("train", train_step)):
        for naive in (False, True):
            name = f"{label}_{'naive' if naive else 'fast'}"
            out[f"{name}_s"] = best_time(make(naive), repeats)
            out[f"{name}_mb"] = peak_memory_mb(make(naive))
    return out


def bench_small_training(epochs: int) -> dict[str, float]:
    world = make_world(classes=10, dim=512, shots=16, views=10, val_shots=4, relevant=25, irrelevant=25, seed=1)
    schedule = ScheduleConfig(epochs=epochs)
    with seeded(1):
        aggregator = build_aggregator("attention", 512, heads=8)
    start = time.perf_counter()
    train_aggregator(aggregator, world.data, world.bank, schedule, epochs, seed=1)
    summaries, _ = compute_summaries(aggregator, world.data.views, world.clean, world.data.labels, world.bank)
    aggregator_s = time.perf_counter() - start
    with seeded(1):
        model = AAPEModel(512, logit_scale=100.0)
    start = time.perf_counter()
    result = train_generator(model, world.data, world.class_text, summaries, 5.0, schedule, epochs, seed=1)
    generator_s = time.perf_counter() - start
    return {"generator_s": generator_s, "aggregator_s": aggregator_s, "val_accuracy": result.best_figures["val_accuracy"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: on a shared CPU extra threads mostly wait on each other; 0 = torch's default)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="fewer repeats and epochs (smoke run; targets still checked)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 10
    print(f"bench_method on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print()

    print("1. stage 3 (distill-generator) on 16 shots x 1000 classes, d=512, batch 32, validation 4 shots/class")
    per_epoch = bench_stage3_epoch(1000, 16, 2)
    print(f"   {per_epoch:.2f} s per epoch (16,000 images, 500 batches, + 4,000 validation images)")
    print(f"   -> CoOp's 50 ImageNet epochs: {50 * per_epoch / 60:.1f} min")
    print()

    print("2. head g for 1000 classes x batch 32, d=512: fast (per-class + per-image parts) vs naive ([B, C, 2d] concatenation)")
    results = {}
    for kind in ("bottleneck", "full"):
        r = bench_head(kind, repeats)
        results[kind] = r
        for label in ("infer", "train"):
            fast_s, naive_s = r[f"{label}_fast_s"], r[f"{label}_naive_s"]
            fast_mb, naive_mb = r[f"{label}_fast_mb"], r[f"{label}_naive_mb"]
            mem = f"peak +{fast_mb:7.1f} MB vs +{naive_mb:7.1f} MB" if fast_mb is not None and naive_mb is not None else "peak memory n/a"
            print(
                f"   {kind:10s} {label:5s}: fast {fast_s * 1e3:8.2f} ms  naive {naive_s * 1e3:8.2f} ms  "
                f"speed-up {naive_s / fast_s:6.1f}x   {mem}"
            )
    print(
        "   (memory: rise of the process's peak RSS; +0.0 MB means the call fit in memory the process already held. "
        f"Largest fast-head tensor: [32, 1000, 32] floats = {32 * 1000 * 32 * 4 / 1e6:.1f} MB for bottleneck, "
        f"[32, 1000, 512] = {32 * 1000 * 512 * 4 / 1e6:.1f} MB for full; the naive concatenation alone is "
        f"[32, 1000, 1024] = {32 * 1000 * 1024 * 4 / 1e6:.1f} MB.)"
    )
    speedup = results["bottleneck"]["infer_naive_s"] / results["bottleneck"]["infer_fast_s"]  # type: ignore[operator]
    train_speedup = results["bottleneck"]["train_naive_s"] / results["bottleneck"]["train_fast_s"]  # type: ignore[operator]
    head_ok = speedup >= HEAD_SPEEDUP_TARGET and train_speedup >= HEAD_SPEEDUP_TARGET
    print(
        f"   target: default (bottleneck) head >= {HEAD_SPEEDUP_TARGET:.0f}x faster, inference and training: "
        f"{speedup:.1f}x / {train_speedup:.1f}x  {verdict(head_ok)}"
    )
    print()

    epochs = 200
    print(f"3. {epochs}-epoch training, 16 shots x 10 classes, d=512, CoOp schedule (batch 32), 10 cached views")
    small = bench_small_training(epochs)
    small_ok = small["generator_s"] < SMALL_TRAINING_TARGET_S
    print(f"   generator (stage 3): {small['generator_s']:.1f} s   (validation accuracy {small['val_accuracy']:.3f} on synthetic data)")
    print(f"   aggregator (stage 2, attention, 50 descriptions/class, incl. summaries): {small['aggregator_s']:.1f} s")
    print(f"   target: stage 3 in < {SMALL_TRAINING_TARGET_S:.0f} s  {verdict(small_ok)}")
    print()
    ok = head_ok and small_ok
    print(f"overall: {verdict(ok)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
