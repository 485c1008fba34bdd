"""Encode image files once: parallel decoding, batched inference, a per-view cache entry.

Every view of a manifest (the evaluation preprocessing, or augmented view v under an augmentation
seed) is its own cache entry, keyed by the backbone (identity, weights, dtype), the preprocessing,
the manifest's content (its list of relative paths) and, for augmented views, the seed and view
index. So raising the number of views encodes only the new views, and a test set is never
re-encoded because the training views changed. Inside an entry every row also records its file's
(size, mtime): a row whose file changed since is re-encoded on its own, not the whole entry.

Augmented view v of an image is drawn with the torch RNG seeded from (seed, relative path, v), so it
is the same whatever the worker count, batch size or the image's position in the manifest.

Long encodings save partial entries every CHECKPOINT_EVERY_S seconds and when interrupted (rows
not encoded yet are stored as stale), so a rerun after Ctrl-C, a crash or a corrupt image continues
where the previous run stopped.
"""

from __future__ import annotations

import contextlib

import hashlib
import itertools
import logging
import multiprocessing
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from aape.backbone import Backbone
from aape.data.images import UnreadableImageError, open_image
from aape.features.cache import CacheEntry, canonical_json, sha256_hex
from aape.locks import exclusive_locks
from aape.logs import progress

log = logging.getLogger(__name__)

SEEDING_SCHEME = "torch.manual_seed(sha256(seed|path|view)) around train_transform"
_MISSING_STAT = (-1, -1)
_PENDING_STAT = -2  # stored for rows not encoded yet when a partial entry is checkpointed
CHECKPOINT_EVERY_S = 300.0  # long encodings save what is done this often (and when interrupted)


@dataclass(frozen=True)
class ViewSpec:
    """One preprocessing of an image: evaluation (`augment_seed is None`) or augmented view `index`."""

    augment_seed: int | None = None
    index: int = 0

    @property
    def is_clean(self) -> bool:
        return self.augment_seed is None

    def describe(self) -> dict[str, Any]:
        if self.is_clean:
            return {"view": "eval-preprocessing"}
        return {"view": "augmented", "augment_seed": self.augment_seed, "index": self.index}


CLEAN = ViewSpec()


def augmented_views(augment_seed: int, count: int) -> list[ViewSpec]:
    return [ViewSpec(augment_seed, v) for v in range(count)]


def view_seed(augment_seed: int, rel_path: str, index: int) -> int:
    """A 63-bit RNG seed for one augmented view of one image, independent of where it is computed."""
    digest = hashlib.sha256(f"{augment_seed}\x00{rel_path}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class SkippedImage:
    row: int
    path: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"row": self.row, "path": self.path, "reason": self.reason}


@dataclass
class ImageFeatures:
    """Features of the readable images of a manifest, aligned by `rows` (manifest row numbers)."""

    features: torch.Tensor  # [K, d] (views=0) or [K, V, d]
    rows: torch.Tensor  # [K] int64, increasing
    skipped: list[SkippedImage] = field(default_factory=list)
    encoded: int = 0  # images run through the image encoder by this call (all views counted)
    reused: int = 0  # image-views taken from the cache
    cache_keys: list[str] = field(default_factory=list)


# keys ------------------------------------------------------------------------------------------


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer: random-init weights differ on every build."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def backbone_key(backbone: Backbone) -> dict[str, Any]:
    """What about the backbone determines the features: identity (incl. weights) and dtype."""
    identity = backbone.identity
    if backbone.random_init:
        cached = getattr(backbone, "_aape_weights_digest", None)
        if cached is None:
            cached = weights_digest(backbone.model)
            setattr(backbone, "_aape_weights_digest", cached)
        identity = f"{identity}#weights-sha256:{cached}"
    return {"backbone": identity, "dtype": str(backbone.dtype).removeprefix("torch."), "embed_dim": backbone.embed_dim}


def preprocessing_key(backbone: Backbone, spec: ViewSpec) -> dict[str, Any]:
    import torchvision  # already imported by the backbone's transforms; kept out of this module's import

    transform = backbone.eval_transform if spec.is_clean else backbone.train_transform
    key = {
        "transform": repr(transform),
        "image_size": backbone.image_size,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "torchvision": torchvision.__version__,
        **spec.describe(),
    }
    if spec.is_clean:
        # JPEGs decoded at reduced scale give slightly different pixels: their own feature version
        key["jpeg_draft"] = backbone.draft_size
    else:
        key["seeding"] = SEEDING_SCHEME
    return key


def manifest_digest(rel_paths: Sequence[str]) -> str:
    return sha256_hex(canonical_json(list(rel_paths)))


def view_entry(backbone: Backbone, rel_paths: Sequence[str], cache_dir: Path | str, spec: ViewSpec) -> CacheEntry:
    key = {
        **backbone_key(backbone),
        "preprocessing": preprocessing_key(backbone, spec),
        "manifest_sha256": manifest_digest(rel_paths),
        "images": len(rel_paths),
    }
    return CacheEntry(cache_dir, "images-eval" if spec.is_clean else "images-aug", key)


def file_stats(root: Path, rel_paths: Sequence[str]) -> torch.Tensor:
    """(size, mtime_ns) of every file, (-1, -1) when missing: [N, 2] int64."""
    rows: list[tuple[int, int]] = []
    base = os.fspath(root)
    for rel in rel_paths:
        try:
            st = os.stat(os.path.join(base, rel))
            rows.append((st.st_size, st.st_mtime_ns))
        except OSError:
            rows.append(_MISSING_STAT)
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)


# decoding --------------------------------------------------------------------------------------


class _DecodeDataset(Dataset):
    """Item i: decode one image, return the uint8 pixels of every view requested for it.

    The evaluation view may come from a reduced-scale JPEG decode (`draft_size`); augmented views
    crop small regions and keep the full decode, so an image needing both is decoded twice.
    """

    def __init__(
        self,
        root: Path,
        rel_paths: Sequence[str],
        jobs: list[tuple[int, tuple[int, ...]]],
        specs: Sequence[ViewSpec],
        eval_transform: Callable,
        train_transform: Callable,
        draft_size: int | None = None,
    ) -> None:
        self.root, self.rel_paths, self.jobs, self.specs = root, list(rel_paths), jobs, list(specs)
        self.eval_transform, self.train_transform, self.draft_size = eval_transform, train_transform, draft_size

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> tuple[int, tuple[int, ...], torch.Tensor | None, str | None]:
        row, spec_ids = self.jobs[i]
        rel = self.rel_paths[row]
        clean = [self.specs[s].is_clean for s in spec_ids]
        try:
            full = open_image(self.root / rel) if not all(clean) else None
            drafted = full  # the evaluation view shares the full decode unless it may be reduced
            if any(clean) and (full is None or self.draft_size):
                drafted = open_image(self.root / rel, self.draft_size)
        except UnreadableImageError as exc:
            return row, spec_ids, None, exc.reason
        views = [self._apply(drafted if is_clean else full, rel, self.specs[s]) for s, is_clean in zip(spec_ids, clean)]
        return row, spec_ids, torch.stack(views), None

    def _apply(self, image, rel: str, spec: ViewSpec) -> torch.Tensor:
        if spec.is_clean:
            return self.eval_transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(spec.augment_seed, rel, spec.index))  # type: ignore[arg-type]
            return self.train_transform(image)


@dataclass
class _Batch:
    pixels: torch.Tensor  # [B_img, 3, H, W] uint8 (Backbone.normalize runs in the encoding process)
    targets: list[tuple[int, int]]  # (row, spec id) of every image in pixels
    failures: list[tuple[int, tuple[int, ...], str]]  # (row, spec ids, reason)
    requested: int  # image-views asked for, failed ones included (for the progress bar)

    def pin_memory(self) -> "_Batch":
        self.pixels = self.pixels.pin_memory()
        return self


def _collate(items: list[tuple[int, tuple[int, ...], torch.Tensor | None, str | None]]) -> _Batch:
    pixels, targets, failures = [], [], []
    requested = 0
    for row, spec_ids, views, reason in items:
        requested += len(spec_ids)
        if views is None:
            failures.append((row, spec_ids, reason or "unreadable"))
            continue
        pixels.append(views)
        targets.extend((row, s) for s in spec_ids)
    return _Batch(torch.cat(pixels) if pixels else torch.empty(0), targets, failures, requested)


def decode_workers(requested: int | str, device: torch.device) -> int:
    """How many decoding processes `features.num_workers` means on this device.

    'auto': on a CPU the encoder's intra-op threads already occupy the cores, and worker processes
    would preempt them mid-GEMM (a stalled thread holds up the others); decoding and CLIP's
    preprocessing cost 0-3% of a ViT-B's time per image there, so they run in the encoding
    process, or on the cores the threads leave free, up to 8 (benchmarks/bench_features.py
    measures both). Beside a GPU the CPU is otherwise idle and decoding is the bottleneck: one
    process per core, up to 8, one core left to the loop that feeds the GPU.
    """
    if requested != "auto":
        return int(requested)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cpu":
        return max(0, min(8, cores - torch.get_num_threads()))
    return max(0, min(8, cores - 1))


def _usable_workers(requested: int, dataset: Dataset, batches: int) -> int:
    """Worker processes only pay off beyond one batch; spawn-based platforms need picklable transforms."""
    workers = min(requested, max(batches - 1, 0))
    if workers and multiprocessing.get_start_method(allow_none=True) not in (None, "fork"):
        try:
            pickle.dumps(dataset)
        except Exception as exc:  # lambdas in a transform cannot be sent to spawned workers
            log.warning("decoding in the main process: the preprocessing cannot be sent to worker processes (%s)", exc)
            workers = 0
    return workers


def _batches(dataset: _DecodeDataset, rows_per_batch: int, num_workers: int, pin: bool) -> Iterable[_Batch]:
    n_batches = -(-len(dataset) // rows_per_batch)
    workers = _usable_workers(num_workers, dataset, n_batches)
    return DataLoader(
        dataset,
        batch_size=rows_per_batch,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


class _ImageTicker:
    """Advances a progress bar by images (so it shows images per second), not by batches."""

    def __init__(self, total: int, desc: str) -> None:
        self._bar: Iterator[int] = progress(range(total), desc, total=total, unit="img")

    def advance(self, n: int) -> None:
        for _ in itertools.islice(self._bar, n):
            pass


# the encoder -----------------------------------------------------------------------------------


@dataclass
class _ViewState:
    entry: CacheEntry
    features: torch.Tensor  # [N, d]
    valid: torch.Tensor  # [N] bool: features[row] holds a feature
    needed: torch.Tensor  # [N] bool: must be (re-)encoded now
    reasons: dict[int, str]  # row -> why unreadable
    dirty: bool  # entry must be (re)written
    pending: torch.Tensor | None = None  # [N] bool: needed and not processed yet (during encoding)


def _initial_state(entry: CacheEntry, stats: torch.Tensor, embed_dim: int, quiet: bool = False) -> _ViewState:
    n = stats.shape[0]
    features = torch.zeros(n, embed_dim)
    valid = torch.zeros(n, dtype=torch.bool)
    cached = entry.load(quiet)
    if cached is None or cached.tensors.get("stats", torch.empty(0)).shape != stats.shape:
        return _ViewState(entry, features, valid, torch.ones(n, dtype=torch.bool), {}, dirty=True)
    fresh = (cached.tensors["stats"] == stats).all(dim=1)
    rows = cached.tensors["rows"]
    keep = fresh[rows]
    features[rows[keep]] = cached.tensors["features"][keep]
    valid[rows[keep]] = True
    reasons = {int(s["row"]): s["reason"] for s in cached.metadata.get("skipped", []) if fresh[int(s["row"])]}
    needed = ~fresh
    return _ViewState(entry, features, valid, needed, reasons, dirty=bool(needed.any()))


def encode_views(
    backbone: Backbone,
    image_root: Path | str,
    rel_paths: Sequence[str],
    cache_dir: Path | str,
    specs: Sequence[ViewSpec],
    *,
    batch_size: int = 64,
    num_workers: int | str = 0,
    desc: str = "images",
) -> tuple[dict[ViewSpec, torch.Tensor], torch.Tensor, list[SkippedImage], dict[str, Any]]:
    """Features of every requested view, from the cache where valid, encoding only what is missing.

    Returns (features per view [K, d], kept manifest rows [K], skipped images, stats). Unreadable
    images are dropped from every view and reported; the caller decides whether that is an error.
    Cache entries are written before returning, so work done is kept even if the caller then stops.
    """
    root = Path(image_root)
    rel_paths = [str(p) for p in rel_paths]
    stats = file_stats(root, rel_paths)
    entries = [view_entry(backbone, rel_paths, cache_dir, s) for s in specs]
    # every view cached: read without the locks, so runs that share features (experiment cells) never wait
    states = [_initial_state(entry, stats, backbone.embed_dim, quiet=True) for entry in entries]
    cached = not any(st.dirty for st in states)
    # else a concurrent run wanting these views waits here, then finds them cached instead of encoding them too
    with contextlib.nullcontext() if cached else exclusive_locks((entry.lock_path, entry.dir.name) for entry in entries):
        if not cached:
            states = [_initial_state(entry, stats, backbone.embed_dim) for entry in entries]
        jobs = _jobs(states, len(rel_paths))
        reused = sum(int((~st.needed).sum()) for st in states)
        encoded, seconds = 0, 0.0
        if jobs:
            encoded, seconds = _encode_jobs(backbone, stats, root, rel_paths, specs, states, jobs, batch_size, num_workers, desc)
        for spec, state in zip(specs, states):
            if state.dirty:
                _save_view(state, stats, root, rel_paths, spec)
    kept = torch.stack([st.valid for st in states]).all(dim=0) if states else torch.ones(len(rel_paths), dtype=torch.bool)
    reasons: dict[int, str] = {}
    for state in states:
        reasons.update(state.reasons)
    skipped = [SkippedImage(row, str(root / rel_paths[row]), reasons.get(row, "unreadable")) for row in (~kept).nonzero().flatten().tolist()]
    rows = kept.nonzero().flatten()
    features = {spec: state.features[rows] for spec, state in zip(specs, states)}
    run_stats = {
        "encoded": encoded,
        "reused": reused,
        "seconds": seconds,
        "images_per_s": encoded / seconds if seconds > 0 else None,
        "cache_keys": [st.entry.dir.name for st in states],
    }
    return features, rows, skipped, run_stats


def _jobs(states: list[_ViewState], n_rows: int) -> list[tuple[int, tuple[int, ...]]]:
    if not states:
        return []
    needed = torch.stack([st.needed for st in states], dim=1).numpy()  # [N, S]
    return [(int(row), tuple(int(s) for s in np.flatnonzero(needed[row]))) for row in np.flatnonzero(needed.any(axis=1))]


def _encode_jobs(
    backbone: Backbone,
    stats: torch.Tensor,
    root: Path,
    rel_paths: list[str],
    specs: Sequence[ViewSpec],
    states: list[_ViewState],
    jobs: list[tuple[int, tuple[int, ...]]],
    batch_size: int,
    num_workers: int | str,
    desc: str,
) -> tuple[int, float]:
    for state in states:  # rows about to be re-encoded lose their old status
        state.valid[state.needed] = False
        state.pending = state.needed.clone()
        for row in state.needed.nonzero().flatten().tolist():
            state.reasons.pop(row, None)
    dataset = _DecodeDataset(root, rel_paths, jobs, specs, backbone.eval_transform, backbone.train_transform, backbone.draft_size)
    views_per_row = max(len(ids) for _, ids in jobs)
    rows_per_batch = max(1, batch_size // views_per_row)
    total = sum(len(ids) for _, ids in jobs)
    ticker = _ImageTicker(total, f"encode {desc}")
    encoded = 0
    start = last_checkpoint = time.perf_counter()
    try:
        workers = decode_workers(num_workers, backbone.device)
        for batch in _batches(dataset, rows_per_batch, workers, pin=backbone.device.type == "cuda"):
            _record_failures(states, batch)
            for chunk_start in range(0, len(batch.targets), batch_size):
                chunk = batch.pixels[chunk_start : chunk_start + batch_size]
                _store(states, batch.targets[chunk_start : chunk_start + batch_size], backbone.encode_images(chunk).cpu())
                encoded += len(chunk)
            ticker.advance(batch.requested)
            if time.perf_counter() - last_checkpoint >= CHECKPOINT_EVERY_S:
                _checkpoint(states, stats, root, rel_paths, specs)
                last_checkpoint = time.perf_counter()
    except BaseException:
        if encoded:  # keep what was encoded: a rerun continues from here
            _checkpoint(states, stats, root, rel_paths, specs)
        raise
    seconds = time.perf_counter() - start
    if encoded:
        log.info("encoded %d %s image-views in %.1fs (%.1f img/s)", encoded, desc, seconds, encoded / seconds)
    return encoded, seconds


def _record_failures(states: list[_ViewState], batch: _Batch) -> None:
    for row, spec_ids, reason in batch.failures:
        for spec_id in spec_ids:
            states[spec_id].reasons[row] = reason
            states[spec_id].pending[row] = False  # type: ignore[index]


def _store(states: list[_ViewState], targets: list[tuple[int, int]], feats: torch.Tensor) -> None:
    pairs = torch.tensor(targets, dtype=torch.int64).reshape(-1, 2)
    for spec_id in pairs[:, 1].unique().tolist():
        mine = pairs[:, 1] == spec_id
        rows = pairs[mine, 0]
        state = states[spec_id]
        state.features[rows] = feats[mine]
        state.valid[rows] = True
        state.pending[rows] = False  # type: ignore[index]


def _checkpoint(states: list[_ViewState], stats: torch.Tensor, root: Path, rel_paths: list[str], specs: Sequence[ViewSpec]) -> None:
    """Save partial entries; rows not encoded yet are stored as stale, so a rerun encodes just those."""
    try:
        for spec, state in zip(specs, states):
            if state.dirty:
                _save_view(state, stats, root, rel_paths, spec)
        log.info("saved partial features of %d view(s) to the cache", sum(st.dirty for st in states))
    except Exception as exc:  # never mask the original error with a checkpoint failure
        log.warning("could not save partial features to the cache: %s", exc)


def _save_view(state: _ViewState, stats: torch.Tensor, root: Path, rel_paths: list[str], spec: ViewSpec) -> None:
    pending = state.pending if state.pending is not None else torch.zeros_like(state.valid)
    stats = stats.clone()
    stats[pending] = _PENDING_STAT
    rows = state.valid.nonzero().flatten()
    unreadable = (~state.valid & ~pending).nonzero().flatten().tolist()
    skipped = [{"row": r, "path": rel_paths[r], "reason": state.reasons.get(r, "unreadable")} for r in unreadable]
    state.entry.save(
        {"features": state.features[rows], "rows": rows, "stats": stats},
        {"skipped": skipped, "image_root": str(root), "view": spec.describe()},
    )


def image_features(
    backbone: Backbone,
    image_root: Path | str,
    rel_paths: Sequence[str],
    cache_dir: Path | str,
    views: int = 0,
    *,
    aug_seed: int = 0,
    skip_unreadable: bool = False,
    batch_size: int = 64,
    num_workers: int | str = 0,
    desc: str = "images",
) -> ImageFeatures:
    """Encode image files (root + relative paths) through the cache.

    views=0: evaluation preprocessing, features [K, d]. views=V: V augmented views (CoOp's
    augmentation, seeded by aug_seed), features [K, V, d]. An unreadable image raises
    UnreadableImageError naming it (after the readable ones are cached), unless skip_unreadable,
    in which case it is left out of features and rows and listed in `skipped`.
    """
    specs = [CLEAN] if views == 0 else augmented_views(aug_seed, views)
    per_view, rows, skipped, stats = encode_views(
        backbone, image_root, rel_paths, cache_dir, specs, batch_size=batch_size, num_workers=num_workers, desc=desc
    )
    if skipped and not skip_unreadable:
        raise_unreadable(skipped, desc)
    features = per_view[CLEAN] if views == 0 else torch.stack([per_view[s] for s in specs], dim=1)
    return ImageFeatures(features, rows, skipped, stats["encoded"], stats["reused"], stats["cache_keys"])


def raise_unreadable(skipped: list[SkippedImage], what: str) -> None:
    """Stop naming the first unreadable image (and how many more there are)."""
    first = skipped[0]
    reason = first.reason
    if len(skipped) > 1:
        others = ", ".join(s.path for s in skipped[1:4]) + (", ..." if len(skipped) > 4 else "")
        reason += f" (and {len(skipped) - 1} more unreadable image(s) in {what}: {others})"
    reason += "; the readable images' features are cached, so a rerun encodes only what is still missing"
    raise UnreadableImageError(first.path, reason)
