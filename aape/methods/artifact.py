"""A trained baseline on disk: baselines/<method>/seed{S}/model.safetensors + model.json (+ history.json).

The JSON records the method, its settings, the backbone it was trained on and the training classes;
reading refuses another method's folder, another backbone's checkpoint and another label space (a
base-to-new model trained on classes that are now "new" would leak them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from aape.data.manifests import ClassesManifest
from aape.features import FeatureBundle
from aape.method.checkpoint import read_checkpoint, write_checkpoint
from aape.methods.errors import MethodError

FORMAT = "aape-baseline/1"
STEM = "model"


def is_trained(directory: Path) -> bool:
    return (Path(directory) / f"{STEM}.json").is_file() and (Path(directory) / f"{STEM}.safetensors").is_file()


def write_baseline(directory: Path, method: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> list[Path]:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return write_checkpoint(directory, STEM, tensors, {"format": FORMAT, "kind": method, "method": method, **meta})


def read_baseline(directory: Path, method: str, bundle: FeatureBundle, info: ClassesManifest) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not is_trained(directory):
        raise MethodError(
            f"no trained {method} for seed {bundle.seed}: {directory} is missing. Run `aape train-baselines` "
            f"(with this run.seeds and evaluation.methods), or remove '{method}' from evaluation.methods."
        )
    tensors, meta = read_checkpoint(directory, STEM, expect_identity=bundle.identity, expect_embed_dim=bundle.embed_dim)
    if meta.get("method") != method or meta.get("format") != FORMAT:
        raise MethodError(f"{directory} holds {meta.get('method')!r} ({meta.get('format')}), not {method}; retrain with `aape train-baselines`")
    trained = meta.get("train_classnames")
    if trained != info.train_classnames:
        raise MethodError(
            f"{method} in {directory} was trained on {len(trained or [])} classes that are not the {len(info.train_classnames)} "
            f"training classes of {info.path} ({info.protocol}); re-run `aape train-baselines` on this data."
        )
    return tensors, meta
