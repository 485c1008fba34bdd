"""Frozen CLIP backbones, from one factory.

`load_backbone` takes an open_clip model name and either a pretrained tag (downloaded or cached by
open_clip), a local checkpoint file, or the explicit choice `random-init`. It never falls back to
random weights: when weights cannot be reached it fails within seconds and says how to supply them.
Our own architecture configs (`aape/model_configs/*.json`, e.g. the tiny test model) are
registered with open_clip so they load by name like the real ones.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from aape.allocator import retain_freed_memory
from aape.config import BackboneConfig
from aape.errors import AAPEError
from aape.network import host_reachable

# torchvision is imported where a transform is built: its import costs seconds (torch._dynamo,
# through torchvision.ops), and the stages that train or evaluate on cached features never need it.
if TYPE_CHECKING:
    from torchvision import transforms as T

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
RANDOM_INIT = "random-init"
RANDOM_INIT_NOTICE = "RANDOM-INIT BACKBONE: weights are random, accuracies mean nothing about CLIP"
# Random-init weights come from a fixed seed, so every process (each stage, predict, a rerun)
# builds the very same network and cached features stay valid.
RANDOM_INIT_SEED = 0


class BackboneError(AAPEError, RuntimeError):
    """The backbone cannot be built as configured; the message says how to fix it."""


@dataclass
class Backbone:
    """A frozen CLIP model with what the pipeline needs to know about it."""

    model: torch.nn.Module
    name: str
    pretrained: str
    identity: str  # what determines the embeddings: model name + weights identity
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    logit_scale: float
    tokenizer: object
    device: torch.device
    dtype: torch.dtype = torch.float32
    jpeg_draft: bool = True
    # PIL operations only, ending in uint8 [3, H, W]: decoding workers ship a quarter of float32's
    # bytes, and the encoder normalises (`normalize`), on the GPU when there is one
    eval_transform: T.Compose = field(repr=False, default=None)  # type: ignore[assignment]
    train_transform: T.Compose = field(repr=False, default=None)  # type: ignore[assignment]

    @property
    def random_init(self) -> bool:
        return self.pretrained == RANDOM_INIT

    @property
    def draft_size(self) -> int | None:
        """What the evaluation view's JPEG decoding may scale down to (aape.data.images.open_image)."""
        return self.image_size if self.jpeg_draft else None

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> the model's input: /255, minus mean, over std, in float32 on the backbone's
        device (the same operations, in the same order, as torchvision's ToTensor + Normalize, so the
        values are bit-identical). Float pixels are taken as already normalised."""
        if pixels.dtype != torch.uint8:
            return pixels.to(self.device, torch.float32, non_blocking=True)
        pixels = pixels.to(self.device, non_blocking=True).to(torch.float32).div_(255)
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        return pixels.sub_(mean).div_(std)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B,3,H,W), uint8 from the transforms or already-normalised floats -> L2-normalised
        float32 embeddings (B,d)."""
        pixels = self.normalize(pixels).to(self.dtype)
        with _autocast(self.device, self.dtype):
            feats = self.model.encode_image(pixels)
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Strings -> L2-normalised float32 embeddings (len(texts), d)."""
        tokens = self.tokenizer(texts).to(self.device)
        with _autocast(self.device, self.dtype):
            feats = encode_text_trimmed(self.model, tokens)
        return torch.nn.functional.normalize(feats.float(), dim=-1)


def encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(tokens)`, computed only up to the batch's last pooled position.

    CLIP's text transformer is causal: a position's output depends only on the positions before it,
    and the embedding is read at the end-of-text token. The padding after the batch's last
    end-of-text token (up to the context length, 77) changes nothing that is read, so it is cut:
    a 15-token description costs a fifth of the work. Models for which this does not hold (no causal
    mask, pooling elsewhere than at end-of-text, a custom text tower) take the full path."""
    length = _pooled_length(model, tokens)
    if length is None or length >= tokens.shape[1]:
        return model.encode_text(tokens)
    from open_clip.transformer import text_global_pool

    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


def _pooled_length(model: torch.nn.Module, tokens: torch.Tensor) -> int | None:
    """1 + the last position any row is pooled at, or None when cutting would change the result."""
    import open_clip

    if type(model) is not open_clip.CLIP or getattr(model, "attn_mask", None) is None:
        return None
    if model.text_pool_type == "argmax":  # OpenAI's end-of-text token has the highest id
        pooled_at = tokens.argmax(dim=-1)
    elif model.text_pool_type == "eos" and getattr(model, "text_eos_id", None) is not None:
        pooled_at = (tokens == model.text_eos_id).int().argmax(dim=-1)
    else:
        return None
    return int(pooled_at.max()) + 1 if tokens.numel() else None


def _autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BackboneError("run.device is 'cuda' but no CUDA device is visible; set run.device: auto or cpu")
    return torch.device(name)


def _resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def register_model_configs() -> None:
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)


def to_rgb(image):
    """A named function (not a lambda) so transforms pickle into spawn-based DataLoader workers."""
    return image.convert("RGB")


def coop_train_transform(size: int) -> T.Compose:
    """CoOp's training augmentation: random resized crop + horizontal flip, bicubic; uint8 out
    (`Backbone.normalize` does ToTensor's /255 and Normalize)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.Lambda(to_rgb),
            T.PILToTensor(),
        ]
    )


def clip_eval_transform(size: int) -> T.Compose:
    """CLIP's evaluation preprocessing: resize the short side, centre crop; uint8 out
    (`Backbone.normalize` does ToTensor's /255 and Normalize)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.Lambda(to_rgb),
            T.PILToTensor(),
        ]
    )


def _file_digest(path: Path, limit: int = 1 << 24) -> str:
    """Size + hash of the first 16 MiB: cheap, and enough to tell checkpoints apart."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        h.update(fh.read(limit))
    return f"{path.stat().st_size}-{h.hexdigest()[:16]}"


def _how_to_supply(model: str, tag: str) -> str:
    return (
        f"How to supply the weights for {model}/{tag}:\n"
        f"  1. on a machine with internet: python -c \"import open_clip; "
        f"open_clip.create_model_and_transforms('{model}', pretrained='{tag}')\"\n"
        f"     then copy its Hugging Face cache (~/.cache/huggingface) here, or set HF_HOME to a copy; or\n"
        f"  2. download the checkpoint file and set backbone.pretrained: /path/to/checkpoint.bin "
        f"(or .safetensors); or\n"
        f"  3. for an offline smoke run only: backbone.pretrained: {RANDOM_INIT} (results are then meaningless)."
    )


def _unknown_model(model: str) -> str:
    return (
        f"backbone.model: '{model}' is not an open_clip architecture. "
        f"Examples: ViT-B-16, ViT-B-32, RN50, ViT-L-14, aape-tiny (see open_clip.list_models())."
    )


def _unknown_tag(model: str, tag: str) -> str:
    import open_clip

    known = open_clip.list_pretrained_tags_by_model(model)
    return (
        f"backbone.pretrained: '{tag}' is not a known open_clip tag for '{model}' and is not an existing file. "
        f"Known tags: {', '.join(known) or 'none'}; or give a checkpoint path, or '{RANDOM_INIT}'."
    )


def _missing_checkpoint(path: str) -> str:
    return f"backbone.pretrained: checkpoint file '{path}' does not exist. Give an existing file, an open_clip tag, or '{RANDOM_INIT}'."


def _looks_like_path(pretrained: str) -> bool:
    return any(sep in pretrained for sep in ("/", "\\")) or pretrained.endswith((".pt", ".bin", ".safetensors"))


def _hf_hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _weights_cached(pretrained_cfg: dict) -> bool:
    hub_id = pretrained_cfg.get("hf_hub", "")
    if not hub_id:
        return False
    from huggingface_hub import try_to_load_from_cache

    repo_id = "/".join(hub_id.rstrip("/").split("/")[:2])
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        cached = try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str) and os.path.exists(cached):
            return True
    return False


def backbone_problems(cfg: BackboneConfig) -> list[str]:
    """What `load_backbone` would refuse, found without building a model or touching the network."""
    import open_clip

    register_model_configs()
    if cfg.model not in open_clip.list_models():
        return [_unknown_model(cfg.model)]
    if cfg.pretrained == RANDOM_INIT or Path(cfg.pretrained).expanduser().is_file():
        return []
    if _looks_like_path(cfg.pretrained):
        return [_missing_checkpoint(cfg.pretrained)]
    pretrained_cfg = open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained)
    if not pretrained_cfg:
        return [_unknown_tag(cfg.model, cfg.pretrained)]
    if _hf_hub_offline() and not _weights_cached(pretrained_cfg):
        return [f"backbone.pretrained: weights {cfg.model}/{cfg.pretrained} are not in the local cache and HF_HUB_OFFLINE is set; "
                f"give a checkpoint file, or '{RANDOM_INIT}' for a smoke run"]  # fmt: skip
    return []


def check_pretrained_reachable(model: str, tag: str) -> None:
    """Fail fast (seconds) when a pretrained tag is neither cached nor downloadable."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        raise BackboneError(_unknown_tag(model, tag))
    if _weights_cached(cfg):
        return
    hub_id = cfg.get("hf_hub", "")
    offline = _hf_hub_offline()
    url = cfg.get("url") or "https://huggingface.co"
    if offline or not host_reachable("https://huggingface.co" if hub_id else url):
        reason = "HF_HUB_OFFLINE is set" if offline else "the weights host cannot be reached"
        raise BackboneError(
            f"pretrained weights {model}/{tag} are not in the local cache and {reason}.\n" + _how_to_supply(model, tag)
        )


def load_backbone(cfg: BackboneConfig, device: str | torch.device = "auto", image_size: int | None = None) -> Backbone:
    """Build a frozen CLIP backbone from config. The only place models are created."""
    import open_clip

    register_model_configs()
    if cfg.model not in open_clip.list_models():
        raise BackboneError(_unknown_model(cfg.model))
    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = _resolve_dtype(cfg.precision, device)
    if device.type == "cpu":
        retain_freed_memory()  # no fresh pages to fault in for every batch's activations (aape/allocator.py)
    pretrained: str | None
    if cfg.pretrained == RANDOM_INIT:
        pretrained, weights_id = None, RANDOM_INIT
        log.warning(RANDOM_INIT_NOTICE)
    elif Path(cfg.pretrained).expanduser().is_file():
        path = Path(cfg.pretrained).expanduser().resolve()
        pretrained, weights_id = str(path), f"file:{path.name}:{_file_digest(path)}"
    elif _looks_like_path(cfg.pretrained):
        raise BackboneError(_missing_checkpoint(cfg.pretrained))
    else:
        check_pretrained_reachable(cfg.model, cfg.pretrained)
        pretrained, weights_id = cfg.pretrained, f"tag:{cfg.pretrained}"
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(cfg.model, pretrained=pretrained, device=device, load_weights=pretrained is not None)
    except Exception as exc:  # open_clip raises several types for bad checkpoints
        raise BackboneError(f"could not build {cfg.model} with weights '{cfg.pretrained}': {exc}") from exc
    model.eval().requires_grad_(False)
    if dtype != torch.float32 and device.type == "cuda":
        model = model.to(dtype)
    visual = model.visual
    size = image_size or _image_size(visual)
    mean = tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    embed_dim = _embed_dim(model)
    backbone = Backbone(
        model=model,
        name=cfg.model,
        pretrained=cfg.pretrained,
        identity=f"{cfg.model}@{weights_id}",
        image_size=size,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        embed_dim=embed_dim,
        logit_scale=float(model.logit_scale.exp().item()),
        tokenizer=open_clip.get_tokenizer(cfg.model),
        device=device,
        dtype=dtype if device.type == "cuda" else torch.float32,
        jpeg_draft=cfg.jpeg_draft,
    )
    backbone.eval_transform = clip_eval_transform(size)
    backbone.train_transform = coop_train_transform(size)
    log.info("backbone %s (d=%d, %dpx) on %s", backbone.identity, embed_dim, size, device)
    return backbone


def _image_size(visual: torch.nn.Module) -> int:
    size = getattr(visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _embed_dim(model: torch.nn.Module) -> int:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[-1])
    if isinstance(proj, torch.nn.Linear):
        return int(proj.out_features)
    return int(model.visual.output_dim)
