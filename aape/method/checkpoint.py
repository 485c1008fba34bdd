"""Checkpoints: `<stem>.safetensors` (weights) + `<stem>.json` (how to rebuild them, what they fit).

The JSON carries the architecture, the configuration, the class names, the backbone identity,
embed_dim, logit_scale and random_init. Loading checks the backbone: weights trained in one
backbone's embedding space are meaningless in another's, so a mismatch is refused, not warned about.
Every file is written to a temporary name and renamed, so an interruption never leaves half a file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from aape.atomic import atomic_save_tensors, atomic_write, atomic_write_json
from aape.errors import AAPEError

log = logging.getLogger(__name__)


class CheckpointError(AAPEError, RuntimeError):
    """A checkpoint is missing or unreadable; the message says which file and what to do."""


class CheckpointMismatchError(AAPEError, ValueError):
    """A checkpoint was trained for another backbone or embedding size than the one in use."""


# atomic writes ---------------------------------------------------------------------------------


def atomic_torch_save(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_resume_state(path: Path, fingerprint: str, fmt: str) -> dict[str, Any] | None:
    """A resume state written for this very run, or None (absent, stale or unreadable: start over)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: training from scratch loses nothing that was valid
        log.warning("ignoring unreadable resume state %s (%s); training from the start", path, exc)
        return None
    if not isinstance(state, dict) or state.get("format") != fmt or state.get("fingerprint") != fingerprint:
        log.warning("ignoring resume state %s: written for another configuration or data; training from the start", path)
        return None
    return state


# checkpoints -----------------------------------------------------------------------------------


def write_checkpoint(directory: Path, stem: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> list[Path]:
    directory = Path(directory)
    weights, info = directory / f"{stem}.safetensors", directory / f"{stem}.json"
    atomic_save_tensors(weights, tensors, {"kind": meta.get("kind", stem)})
    atomic_write_json(info, meta)
    return [weights, info]


def read_checkpoint(
    directory: Path,
    stem: str,
    expect_identity: str | None = None,
    expect_embed_dim: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and metadata; refuses a checkpoint made for another backbone or embedding size."""
    directory = Path(directory)
    weights, info = directory / f"{stem}.safetensors", directory / f"{stem}.json"
    for path in (weights, info):
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing; train it first (aape train-aggregator / distill-generator)")
    try:
        meta = json.loads(info.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{info} is not valid JSON ({exc}); retrain to rewrite it") from None
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights} is unreadable ({exc}); retrain to rewrite it") from None
    identity = meta.get("backbone_identity")
    if expect_identity is not None and identity != expect_identity:
        raise CheckpointMismatchError(
            f"checkpoint {directory} was trained on embeddings of backbone {identity!r}, not {expect_identity!r}: "
            f"its weights mean nothing in another embedding space. Use the backbone it was trained with "
            f"(backbone.model / backbone.pretrained), or retrain on features of this backbone."
        )
    dim = meta.get("embed_dim")
    if expect_embed_dim is not None and dim != expect_embed_dim:
        raise CheckpointMismatchError(
            f"checkpoint {directory} expects {dim}-d embeddings but the features in use are {expect_embed_dim}-d "
            f"(backbone {identity!r} vs the current one): retrain on features of the current backbone."
        )
    return tensors, meta


def load_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """load_state_dict with an error that names the checkpoint rather than a key list."""
    try:
        module.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(
            f"the weights in {source} do not fit the architecture its JSON describes ({exc}); "
            f"the two files come from different runs: retrain"
        ) from None
