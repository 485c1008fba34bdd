"""Stage prepare-data: the dataset's splits, the class plan and the few-shot draws of every seed.

Writes (docs/architecture.md, data/): classes.json, split_{train,val,test}.parquet,
fewshot/seed{S}/{train,val}.parquet, and skipped.json (images dropped with data.skip_unreadable).

Checks before anything is written: every file the split names exists (one os.stat each), and every
image the run will use (the draws of every seed and the test set) has a readable image header.
Decoding the pixels is left to extract-features, which also honours data.skip_unreadable.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from aape.atomic import atomic_write_json
from aape.config import VL_TASKS, Params
from aape.data.images import DataError, UnreadableImageError
from aape.data.manifests import ClassesManifest, write_manifest
from aape.data.protocol import Shortfall, cap_per_class, class_plan, draw_fewshot
from aape.data.records import SPLITS, DatasetSplits, MissingImagesError, Record, dataset_hash, find_missing_files
from aape.data.registry import build_dataset, canonical_name
from aape.layout import Layout
from aape.logs import progress, stage
from aape.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

SKIP_REPORT = "skipped.json"


def probe_image(path: Path) -> str | None:
    """None when the file exists and its header is an image PIL can open; else the reason."""
    try:
        if os.stat(path).st_size == 0:
            return "file is empty (0 bytes)"
        with Image.open(path) as image:
            image.size  # noqa: B018 - parsing the header is the check
        return None
    except FileNotFoundError:
        return "file does not exist"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _drop(splits: DatasetSplits, bad: set[str]) -> None:
    for name in SPLITS:
        setattr(splits, name, [r for r in splits.split(name) if r.path not in bad])


def _where(splits: DatasetSplits, paths: set[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in SPLITS:
        for record in splits.split(name):
            if record.path in paths:
                found.setdefault(record.path, name)
    return found


def _drop_missing(splits: DatasetSplits, skip: bool, skipped: list[dict[str, Any]]) -> None:
    missing = find_missing_files(splits)
    if not missing:
        return
    if not skip:
        raise MissingImagesError(missing, splits.image_root, splits.split_source)
    log.warning("%d listed image(s) do not exist; dropping them (data.skip_unreadable: true)", len(missing))
    skipped += [{"split": s, "path": p, "reason": "file does not exist"} for s, p in missing]
    _drop(splits, {p for _, p in missing})


def _draws(splits: DatasetSplits, params: Params, train_classes: list[int], shortfalls: list[Shortfall]) -> dict[int, dict[str, list[Record]]]:
    cfg = params.data
    return {
        seed: {
            "train": draw_fewshot(splits.train, cfg.shots, seed, "train", train_classes, shortfalls),
            "val": draw_fewshot(splits.val, cfg.effective_val_shots, seed, "val", train_classes, shortfalls),
        }
        for seed in params.run.seeds
    }


def _plan_checked(
    splits: DatasetSplits, params: Params, train_classes: list[int], skipped: list[dict[str, Any]]
) -> tuple[dict[int, dict[str, list[Record]]], list[Record], list[Shortfall]]:
    """Draws and capped test, after probing every image they use; unreadable ones are dropped and
    the draws redone (only classes that lost a drawn image change), or the stage stops naming the file."""
    root = Path(splits.image_root)
    verdict: dict[str, str | None] = {}
    while True:
        shortfalls: list[Shortfall] = []
        draws = _draws(splits, params, train_classes, shortfalls)
        test = cap_per_class(splits.test, params.data.test_per_class)
        used = {r.path for parts in draws.values() for recs in parts.values() for r in recs} | {r.path for r in test}
        todo = sorted(used - verdict.keys())
        for rel in progress(todo, desc="prepare-data: checking images", unit="img"):
            verdict[rel] = probe_image(root / rel)
        bad = {p for p in used if verdict[p]}
        if not bad:
            return draws, test, _unique(shortfalls)
        first = sorted(bad)[0]
        if not params.data.skip_unreadable:
            more = f" ({len(bad) - 1} more unreadable image(s) among those this run uses)" if len(bad) > 1 else ""
            raise UnreadableImageError(root / first, f"{verdict[first]}{more}")
        log.warning("%d unreadable image(s), e.g. %s (%s); dropping them and redrawing", len(bad), first, verdict[first])
        split_of = _where(splits, bad)
        skipped += [{"split": split_of.get(p, "?"), "path": p, "reason": verdict[p]} for p in sorted(bad)]
        _drop(splits, bad)


def _unique(shortfalls: list[Shortfall]) -> list[Shortfall]:
    return list({(s.label, s.wanted): s for s in shortfalls}.values())


def _manifest(splits: DatasetSplits, params: Params, train_classes, eval_sets, source_hash: str, n_skipped: int) -> ClassesManifest:
    cfg = params.data
    return ClassesManifest(
        dataset=splits.name,
        image_root=splits.image_root,
        classnames=splits.classnames,
        protocol=cfg.protocol,
        train_classes=train_classes,
        eval_sets=eval_sets,
        split_hash=source_hash,
        seeds=list(params.run.seeds),
        shots=cfg.shots,
        val_shots=cfg.effective_val_shots,
        test_per_class=cfg.test_per_class,
        split_source=splits.split_source,
        official_split=splits.official_split,
        notes=splits.notes,
        skipped_images=n_skipped,
    )


def run(params: Params, tracker: Tracker | None = None) -> dict[str, Any]:
    tracker = tracker or NullTracker()
    layout = Layout.from_params(params)
    cfg = params.data
    if params.run.task == "retrieval":
        from aape.retrieval import pipeline as retrieval

        with stage("prepare-data") as summary:
            retrieval.prepare_data(params, summary)
        return summary
    if params.run.task in VL_TASKS:
        from aape.vl import pipeline as vl

        with stage("prepare-data") as summary:
            vl.prepare_data(params, summary)
        return summary
    with stage("prepare-data") as summary:
        splits = build_dataset(cfg)
        if splits.eval_only:
            raise DataError(
                f"{splits.name} is a test-only dataset (no training images): train on imagenet "
                f"(data.dataset: imagenet) and list {canonical_name(cfg.dataset)} in evaluation.domain_shift"
            )
        source_hash = dataset_hash(splits)
        skipped: list[dict[str, Any]] = []
        _drop_missing(splits, cfg.skip_unreadable, skipped)
        train_classes, eval_sets = class_plan(cfg.protocol, range(splits.num_classes))
        draws, test, shortfalls = _plan_checked(splits, params, train_classes, skipped)

        meta = {"dataset": splits.name, "split_hash": source_hash, "image_root": splits.image_root}
        classes = _manifest(splits, params, train_classes, eval_sets, source_hash, len(skipped))
        outputs = [classes.write(layout.classes_file)]
        for name, records in (("train", splits.train), ("val", splits.val), ("test", test)):
            outputs.append(write_manifest(records, layout.split_manifest(name), {**meta, "split": name}))
        for seed, parts in draws.items():
            for name, records in parts.items():
                shots = cfg.shots if name == "train" else cfg.effective_val_shots
                info = {**meta, "split": name, "seed": seed, "shots": shots, "protocol": cfg.protocol, "classes": train_classes}
                outputs.append(write_manifest(records, layout.fewshot_manifest(seed, name), info))
        outputs.append(atomic_write_json(layout.data / SKIP_REPORT, skipped))
        summary["outputs"] += [str(p) for p in outputs]

        counts = {"train": len(splits.train), "val": len(splits.val), "test": len(test)}
        summary.update(
            dataset=splits.name,
            num_classes=splits.num_classes,
            counts=counts,
            protocol=cfg.protocol,
            train_classes=len(train_classes),
            eval_sets={k: len(v) for k, v in eval_sets.items()},
            split_hash=source_hash,
            official_split=splits.official_split,
            seeds=list(params.run.seeds),
            shots=cfg.shots,
            val_shots=cfg.effective_val_shots,
            draws={seed: {k: len(v) for k, v in parts.items()} for seed, parts in draws.items()},
            skipped=len(skipped),
            shortfalls=[asdict(s) for s in shortfalls],
        )
        _report(summary, splits, eval_sets)
        tracker.set_tags({"dataset": splits.name, "split_official": str(splits.official_split).lower(), "split_hash": source_hash[:12]})
        tracker.log_metrics(
            {
                "data/num_classes": splits.num_classes,
                **{f"data/{k}_images": v for k, v in counts.items()},
                **{f"data/{k}_classes": len(v) for k, v in eval_sets.items()},
                "data/skipped_images": len(skipped),
            }
        )
        tracker.log_artifact(layout.classes_file, "data")
    return summary


def _report(summary: dict[str, Any], splits: DatasetSplits, eval_sets: dict[str, list[int]]) -> None:
    log.info(
        "dataset %s: %d classes; train %d / val %d / test %d images; split: %s",
        splits.name, splits.num_classes, *summary["counts"].values(), splits.split_source,
    )
    if not splits.official_split:
        log.warning("the split is NOT the official one: numbers will not compare with published tables")
    log.info(
        "protocol %s: train on %d classes; eval sets %s; %d-shot train / %d-shot val for seeds %s",
        summary["protocol"], summary["train_classes"], summary["eval_sets"], summary["shots"], summary["val_shots"], summary["seeds"],
    )
    if summary["skipped"]:
        log.warning("%d image(s) skipped: see %s", summary["skipped"], SKIP_REPORT)
