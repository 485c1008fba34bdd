"""Concurrent runs on one cache: the second waits for the first and reuses its entry."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aape.features import image_features, text_features
from aape.features.text_encoder import text_entry

TEXTS = ["a photo of a cloud.", "a photo of a boat.", "a photo of an apple."]
SLOW_S = 1.5  # long enough for the other run to arrive while the entry is being computed


def slow_and_counted(encode, counts: Path):
    """`encode`, made slow, appending one line to `counts` per call (visible across processes)."""

    def wrapper(batch):
        with counts.open("a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(SLOW_S)
        return encode(batch)

    return wrapper


def _encode_texts_in_a_process(cache_dir: str, counts: str, out: str, start: multiprocessing.synchronize.Barrier) -> None:
    from aape.backbone import load_backbone
    from aape.config import BackboneConfig

    backbone = load_backbone(BackboneConfig(model="aape-tiny", pretrained="random-init"), device="cpu")
    backbone.encode_texts = slow_and_counted(backbone.encode_texts, Path(counts))
    start.wait(timeout=300)  # both processes ask for the entry at the same moment
    torch.save(text_features(backbone, TEXTS, cache_dir), out)


def _hold_lock_forever(lock_path: str, ready: str) -> None:
    from aape.locks import exclusive_lock

    with exclusive_lock(lock_path, "a doomed run"):
        Path(ready).touch()
        time.sleep(3600)



def run_side_by_side(work, runs: int = 2) -> None:
    """`work(slot)` for each slot in its own thread, all started before any is joined."""
    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

def test_two_processes_encode_an_entry_once_and_share_it(tmp_path: Path):
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    counts = tmp_path / "calls.txt"
    outs = [tmp_path / f"features{i}.pt" for i in range(2)]
    workers = [context.Process(target=_encode_texts_in_a_process, args=(str(tmp_path / "cache"), str(counts), str(out), start)) for out in outs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [w.exitcode for w in workers] == [0, 0]
    assert len(counts.read_text().splitlines()) == 1  # one batch of 3 texts, encoded by one process only
    first, second = (torch.load(out) for out in outs)
    assert first.shape == (3, 64) and torch.equal(first, second)


def test_two_threads_encode_images_once_and_the_waiting_one_says_so(tiny_backbone, tmp_path: Path, monkeypatch, caplog):
    root = tmp_path / "images"
    paths = [f"c{i}/{i}.png" for i in range(4)]
    for i, rel in enumerate(paths):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(root / rel)
    counts = tmp_path / "calls.txt"
    monkeypatch.setattr(tiny_backbone, "encode_images", slow_and_counted(tiny_backbone.encode_images, counts))
    results: list = [None, None]

    def encode(slot: int) -> None:
        results[slot] = image_features(tiny_backbone, root, paths, tmp_path / "cache")

    with caplog.at_level(logging.INFO, logger="aape.locks"):
        run_side_by_side(encode)
    assert len(counts.read_text().splitlines()) == 1  # 4 images fit one batch: one encode call in all
    assert sorted((r.encoded, r.reused) for r in results) == [(0, 4), (4, 0)]
    assert torch.equal(results[0].features, results[1].features)
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for another run computing")]
    assert waiting == [f"waiting for another run computing {results[0].cache_keys[0]}"]


def test_a_lock_left_by_a_killed_process_does_not_block(tiny_backbone, tmp_path: Path):
    # flock locks die with their process: the kernel releases them when a killed holder's files close
    entry = text_entry(tiny_backbone, TEXTS, tmp_path / "cache")
    ready = tmp_path / "locked"
    holder = multiprocessing.get_context("spawn").Process(target=_hold_lock_forever, args=(str(entry.lock_path), str(ready)))
    holder.start()
    deadline = time.monotonic() + 120
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists() and entry.lock_path.exists()
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(timeout=30)
    assert holder.exitcode == -signal.SIGKILL
    finished = threading.Event()

    def encode() -> None:
        text_features(tiny_backbone, TEXTS, tmp_path / "cache")
        finished.set()

    threading.Thread(target=encode, daemon=True).start()
    assert finished.wait(timeout=30), "the dead process's lock still blocks the entry"
    assert entry.is_complete()


def test_two_runs_of_one_prompt_plan_request_each_answer_once(tmp_path: Path, monkeypatch, caplog):
    from aape.config import load_params
    from aape.data.manifests import ClassNames
    from aape.prompts import generate
    from aape.prompts.answers import RunStats, make_entry

    requested: list[str] = []

    def fake_llm(params, jobs, system, sampling, persist):
        requested.extend(job.key for job in jobs)
        time.sleep(SLOW_S)
        persist([make_entry(job, source="local", model="fake", sampling=sampling, raw_text=f"{job.class_name} seen in view {job.sample_index}.",
                            finish_reason="stop", prompt_tokens=1, completion_tokens=1, request_id=None) for job in jobs])  # fmt: skip
        return RunStats()

    monkeypatch.setattr(generate, "_answer_missing", fake_llm)
    params = load_params(None, [f"run.cache_dir={tmp_path / 'cache'}", "prompts.max_templates=1", "prompts.n_per_template=2"])
    classes = ClassNames("eurosat", ["Forest", "River"])
    results: list = [None, None]

    def describe(slot: int) -> None:
        results[slot] = generate.generate_from_llm(params, classes)

    with caplog.at_level(logging.INFO, logger="aape.locks"):
        run_side_by_side(describe)
    assert len(requested) == len(set(requested)) == 4  # 2 classes x 1 prompt x 2 samples, asked once
    assert [r["text"] for r in results[0].rows] == [r["text"] for r in results[1].rows] and len(results[0].rows) == 4
    assert sorted(r.summary["requests"]["from_journal"] for r in results) == [0, 4]
    assert sum("waiting for another run computing the LLM answers of plan" in r.getMessage() for r in caplog.records) == 1


def test_a_complete_entry_is_read_while_another_run_holds_its_lock(tmp_path, tiny_backbone):
    """Runs that only read shared features (experiment cells) do not queue behind each other."""
    from aape.features.image_encoder import CLEAN, view_entry

    text_features(tiny_backbone, TEXTS, tmp_path)  # the entries exist and are complete
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    image_features(tiny_backbone, folder, ["0.png", "1.png", "2.png"], tmp_path)
    held, release = threading.Event(), threading.Event()
    entries = [text_entry(tiny_backbone, TEXTS, tmp_path), view_entry(tiny_backbone, ["0.png", "1.png", "2.png"], tmp_path, CLEAN)]

    def hold():
        from aape.locks import exclusive_locks

        with exclusive_locks((e.lock_path, e.dir.name) for e in entries):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        started = time.perf_counter()
        text_features(tiny_backbone, TEXTS, tmp_path)
        image_features(tiny_backbone, folder, ["0.png", "1.png", "2.png"], tmp_path)
        assert time.perf_counter() - started < 2.0  # did not wait for the holder's lock
    finally:
        release.set()
        holder.join()
