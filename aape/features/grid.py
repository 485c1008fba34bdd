"""Grid features: the image encoder's spatial feature vectors before pooling, for LiMBeR's prefix
(docs/method.md, "Captioning and VQA").

LiMBeR (Merullo et al., ICLR 2023) replaces RN50x16's attention pooling by a reshape of the last
stage's 12 x 12 x 3072 map into 144 vectors and maps each to one language-model embedding. Here:

    ModifiedResNet     the last stage's output [B, C, H, W] -> [B, H*W, C] (LiMBeR exactly)
    VisionTransformer  the last block's patch tokens after ln_post, class token dropped [B, L, width]
                       (open_clip's `output_tokens`; LiMBeR's BEiT variant reads patch tokens too)

At 144 x 3072 values an image, the grids of COCO's 113k training images take about 100 GB in
float16, so they are not tensors in a safetensors file like the pooled features: each manifest's
grids are one memory-mapped `.npy` in the feature cache, read a batch at a time while training.

    <cache_dir>/features/grid-<digest>/
        key.json     what determines the grids (backbone and weights, preprocessing, manifest)
        grid.npy     float16 [N, G, C], memory-mapped, filled as batches are encoded
        done.npy     uint8 [N]: rows encoded so far (saved every few minutes and when interrupted)
        stats.npy    int64 [N, 2]: each image's (size, mtime_ns) when it was encoded
        COMPLETE     the shape and the byte size of grid.npy (written last)

A rerun after an interruption encodes only the rows not done; an image whose file changed is
encoded again. COMPLETE records sizes rather than a checksum: hashing 100 GB would cost more than
most reruns. The run's features/grid_{split}.json points at the entry, so DVC tracks a small
pointer instead of copying the grids into its cache.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from aape.atomic import atomic_write_json
from aape.backbone import Backbone, BackboneError, _autocast
from aape.data.images import UnreadableImageError
from aape.features.bundle import FeatureError
from aape.features.cache import CacheEntry
from aape.features.image_encoder import (
    CHECKPOINT_EVERY_S,
    CLEAN,
    _batches,
    _DecodeDataset,
    _ImageTicker,
    backbone_key,
    decode_workers,
    file_stats,
    manifest_digest,
    preprocessing_key,
)
from aape.layout import Layout
from aape.locks import exclusive_lock

log = logging.getLogger(__name__)

GRID_VERSION = 1
DTYPE = np.float16  # half the bytes of float32; the prefix map computes in float32
DISK_MARGIN = 1 << 30  # leave a GiB free beside the grids


# the encoder's grid ---------------------------------------------------------------------------------


def _tower(backbone: Backbone) -> str:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    visual = backbone.model.visual
    if isinstance(visual, ModifiedResNet):
        return "resnet"
    if isinstance(visual, VisionTransformer) and visual.attn_pool is None and not visual.final_ln_after_pool:
        return "vit"
    raise BackboneError(
        f"backbone {backbone.name}: its image tower ({type(visual).__name__}) has no grid of feature vectors "
        "this project can read (open_clip's ModifiedResNet and plain VisionTransformer do); set prefix.image_features: pooled"
    )


def grid_tokens(backbone: Backbone, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (uint8 from the transforms, or normalised floats) -> float32 grid vectors [B, G, C]."""
    return _grid(backbone, pixels)


@torch.inference_mode()
def _grid(backbone: Backbone, pixels: torch.Tensor) -> torch.Tensor:
    tower = _tower(backbone)
    pixels = backbone.normalize(pixels).to(backbone.dtype)
    visual = backbone.model.visual
    with _autocast(backbone.device, backbone.dtype):
        if tower == "resnet":
            stage = visual.forward_intermediates(pixels, indices=1, intermediates_only=True)["image_intermediates"][-1]
            grid = stage.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C], row-major like LiMBeR's rearrange
        else:
            grid = visual.forward_intermediates(pixels, indices=1, intermediates_only=True, normalize_intermediates=True,
                                                output_fmt="NLC")["image_intermediates"][-1]
    return grid.float()


def grid_shape(backbone: Backbone) -> tuple[int, int]:
    """(G, C): grid vectors per image and their width, from one blank image."""
    blank = torch.zeros(1, 3, backbone.image_size, backbone.image_size, dtype=torch.uint8)
    _, tokens, channels = _grid(backbone, blank).shape
    return int(tokens), int(channels)


# the store --------------------------------------------------------------------------------------------


def grid_entry(backbone: Backbone, rel_paths: Sequence[str], cache_dir: Path | str) -> CacheEntry:
    key = {**backbone_key(backbone), "preprocessing": preprocessing_key(backbone, CLEAN), "tower": _tower(backbone),
           "manifest_sha256": manifest_digest(rel_paths), "images": len(rel_paths), "grid_version": GRID_VERSION}
    return CacheEntry(cache_dir, "grid", key)


@dataclass
class GridFeatures:
    """A manifest's grids, memory-mapped: `take(rows)` reads only the rows asked for."""

    path: Path
    array: np.ndarray  # float16 [N, G, C], mode 'r'

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def take(self, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """float32 [len(rows), G, C]."""
        index = np.asarray(rows.tolist() if isinstance(rows, torch.Tensor) else list(rows), dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(self.array[index])).float()


def open_grid(entry_dir: Path | str) -> GridFeatures:
    """A complete store's grids; a missing or unfinished one is an error saying how to make it."""
    folder = Path(entry_dir)
    try:
        marker = json.loads((folder / "COMPLETE").read_text())
        array = np.load(folder / "grid.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise FeatureError(f"grid features {folder} are missing or unfinished ({exc.__class__.__name__}): "
                           "rerun `aape extract-features` (with dvc: `dvc repro --force extract-features`)") from None
    if list(array.shape) != marker["shape"]:
        raise FeatureError(f"grid features {folder / 'grid.npy'} have shape {list(array.shape)}, COMPLETE says {marker['shape']}: "
                           "delete the folder and rerun `aape extract-features`")
    return GridFeatures(folder / "grid.npy", array)


def encode_grids(backbone: Backbone, image_root: Path | str, rel_paths: Sequence[str], cache_dir: Path | str, *,
                 batch_size: int = 64, num_workers: int | str = 0, desc: str = "images") -> GridFeatures:
    """Every image's grid through the store: encodes only rows not done (or whose file changed)."""
    root, rel_paths = Path(image_root), [str(p) for p in rel_paths]
    entry = grid_entry(backbone, rel_paths, cache_dir)
    folder = entry.dir
    if (folder / "COMPLETE").is_file() and _unchanged(folder, root, rel_paths):
        return open_grid(folder)
    with exclusive_lock(entry.lock_path, folder.name):
        stats = file_stats(root, rel_paths).numpy()
        array, done = _open_for_writing(entry, backbone, len(rel_paths), stats)
        todo = np.flatnonzero(~done)
        if len(todo):
            _encode_rows(backbone, root, rel_paths, folder, array, done, stats, todo, batch_size, num_workers, desc)
        del array
        atomic_write_json(folder / "COMPLETE", {"shape": list(np.load(folder / "grid.npy", mmap_mode="r").shape),
                                                "bytes": (folder / "grid.npy").stat().st_size})
    return open_grid(folder)


def _unchanged(folder: Path, root: Path, rel_paths: list[str]) -> bool:
    try:
        return bool((np.load(folder / "stats.npy") == file_stats(root, rel_paths).numpy()).all())
    except (OSError, ValueError):
        return False


def _open_for_writing(entry: CacheEntry, backbone: Backbone, n: int, stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The store's grid.npy opened for writing and the rows already done (fresh ones only)."""
    folder = entry.dir
    tokens, channels = grid_shape(backbone)
    (folder / "COMPLETE").unlink(missing_ok=True)  # being written: unfinished meanwhile
    try:
        array = np.load(folder / "grid.npy", mmap_mode="r+")
        done = np.load(folder / "done.npy").astype(bool) & (np.load(folder / "stats.npy") == stats).all(axis=1)
        if array.shape == (n, tokens, channels) and done.shape == (n,):
            return array, done
    except (OSError, ValueError):
        pass
    folder.mkdir(parents=True, exist_ok=True)
    _check_space(folder, n * tokens * channels * np.dtype(DTYPE).itemsize, backbone.name)
    atomic_write_json(folder / "key.json", entry.key)
    array = np.lib.format.open_memmap(folder / "grid.npy", mode="w+", dtype=DTYPE, shape=(n, tokens, channels))
    return array, np.zeros(n, dtype=bool)


def _check_space(folder: Path, needed: int, backbone: str) -> None:
    free = shutil.disk_usage(folder).free
    if needed + DISK_MARGIN > free:
        raise FeatureError(f"grid features of {backbone} need {needed / 1e9:.1f} GB in {folder}, only {free / 1e9:.1f} GB is free: "
                           "free disk space, point run.cache_dir at a larger disk, or set prefix.image_features: pooled")


def _encode_rows(backbone: Backbone, root: Path, rel_paths: list[str], folder: Path, array: np.ndarray, done: np.ndarray,
                 stats: np.ndarray, todo: np.ndarray, batch_size: int, num_workers: int | str, desc: str) -> None:
    jobs = [(int(row), (0,)) for row in todo]
    dataset = _DecodeDataset(root, rel_paths, jobs, [CLEAN], backbone.eval_transform, backbone.train_transform, backbone.draft_size)
    workers = decode_workers(num_workers, backbone.device)
    ticker = _ImageTicker(len(jobs), f"encode {desc}")
    last_save, encoded, start = time.perf_counter(), 0, time.perf_counter()
    try:
        for batch in _batches(dataset, batch_size, workers, pin=backbone.device.type == "cuda"):
            if batch.failures:
                row, _, reason = batch.failures[0]
                raise UnreadableImageError(str(root / rel_paths[row]), reason + "; the grids encoded so far are kept, a rerun continues")
            rows = np.asarray([row for row, _ in batch.targets], dtype=np.int64)
            array[rows] = grid_tokens(backbone, batch.pixels).cpu().numpy().astype(DTYPE)
            done[rows] = True
            encoded += len(rows)
            ticker.advance(batch.requested)
            if time.perf_counter() - last_save >= CHECKPOINT_EVERY_S:
                _save_progress(folder, array, done, stats)
                last_save = time.perf_counter()
    finally:
        _save_progress(folder, array, done, stats)
    seconds = time.perf_counter() - start
    log.info("encoded %d %s grids in %.1fs (%.1f img/s)", encoded, desc, seconds, encoded / max(seconds, 1e-9))


def _save_progress(folder: Path, array: np.ndarray, done: np.ndarray, stats: np.ndarray) -> None:
    """Flush the grids, then record which rows they hold (in that order: done never runs ahead of the data)."""
    array.flush()
    kept = stats.copy()
    kept[~done] = -2
    for name, value in (("stats.npy", kept), ("done.npy", done.astype(np.uint8))):
        temporary = folder / f".{name}.tmp"
        with temporary.open("wb") as handle:
            np.save(handle, value)
        temporary.replace(folder / name)


# the run's pointers -------------------------------------------------------------------------------------


def pointer_file(layout: Layout, split: str) -> Path:
    return layout.features / f"grid_{split}.json"


def write_pointer(layout: Layout, split: str, grids: GridFeatures, meta: dict[str, Any]) -> Path:
    path = pointer_file(layout, split)
    atomic_write_json(path, {**meta, "split": split, "entry": str(grids.path.parent), "shape": list(grids.shape),
                             "dtype": np.dtype(DTYPE).name})
    return path


def remove_pointers(layout: Layout) -> None:
    """Drop grid pointers an earlier run with prefix.image_features: grid left in features/ (the grids stay cached)."""
    for path in layout.features.glob("grid_*.json"):
        path.unlink()


def read_grid(layout: Layout, split: str, identity: str | None = None) -> GridFeatures:
    """The grids of a split of this run (written by extract-features with prefix.image_features: grid)."""
    path = pointer_file(layout, split)
    if not path.is_file():
        raise FeatureError(f"{path} not found: prefix.image_features is grid but extract-features wrote no grid features; "
                           "rerun `aape extract-features` with this params.yaml")
    pointer = json.loads(path.read_text())
    if identity is not None and pointer.get("identity") != identity:
        raise FeatureError(f"{path} holds grids of {pointer.get('identity')!r}, not of {identity!r}: rerun `aape extract-features`")
    grids = open_grid(pointer["entry"])
    if list(grids.shape) != pointer["shape"]:
        raise FeatureError(f"{path} says shape {pointer['shape']}, {grids.path} holds {list(grids.shape)}: rerun `aape extract-features`")
    return grids
