"""`aape predict`: classify image files or folders with a trained AAPE model and any class names.

New classes need no retraining: a class is only its name, encoded as "a photo of a {name}." by the
same backbone the model was trained on; AAPE's fast head then scores every image against them.

Which backbone: the model's own. A generator checkpoint records the identity of the backbone whose
embedding space it was trained in (`ViT-B-16@tag:openai`, `ViT-B-32@random-init`,
`name@file:<file>:<digest>`), and its weights mean nothing in any other. So the model name and an
open_clip tag come from the checkpoint, whatever params.backbone says (a difference is logged);
only a checkpoint *file* cannot be recorded portably, so for those params.backbone.pretrained must
name the file, and loading refuses a file whose digest differs.

The same `Predictor` serves the MLflow pyfunc model (aape.integrations.pyfunc), so `aape predict`
and the registered model give the same answers on the same images.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import logging
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from aape.config import BackboneConfig, Params
from aape.data.images import IMAGE_SUFFIXES, UnreadableImageError, is_image_file, load_rgb, open_image
from aape.errors import AAPEError
from aape.logs import progress

log = logging.getLogger(__name__)

RANDOM_INIT_WEIGHTS = "random-init"
GENERATOR_JSON = "generator.json"


class PredictionError(AAPEError, ValueError):
    """Bad input to prediction (class list, image path, model directory); the message names it."""


@dataclass
class Prediction:
    path: str
    labels: list[str]
    probabilities: list[float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# class names -----------------------------------------------------------------------------------


def read_class_names(spec: str) -> list[str]:
    """Class names from "cat,dog,bird" or from a file with one name per line (blank lines and
    lines starting with # are ignored). Duplicates and an empty list are errors."""
    path = Path(spec)
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        names = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        source = f"class file {path}"
    else:
        names = [part.strip() for part in spec.split(",") if part.strip()]
        source = f"--classes {spec!r}"
    return validate_class_names(names, source)


def validate_class_names(names: Sequence[str], source: str = "class names") -> list[str]:
    names = [str(n).strip() for n in names if str(n).strip()]
    if len(names) < 2:
        raise PredictionError(
            f"{source} gives {len(names)} class name(s); give at least two, comma-separated or one per line in a file"
        )
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise PredictionError(f"{source} lists {', '.join(map(repr, duplicates))} more than once; each class once")
    return names


# images ----------------------------------------------------------------------------------------


def collect_images(paths: Iterable[Path]) -> list[Path]:
    """Files as given, folders searched recursively for image files; sorted, without duplicates."""
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p.name))
            if not inside:
                raise PredictionError(
                    f"folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)}), also in its sub-folders; "
                    f"point at a folder with images or at image files"
                )
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise PredictionError(f"{path} does not exist; give image files or folders")
    return sorted(dict.fromkeys(found))


def decode_image(value: Any, where: str, draft_size: int | None = None) -> Image.Image:
    """A PIL image from a path, raw bytes or a base64 string (what a pyfunc request carries).

    `draft_size`: decode large JPEGs at reduced scale, as the feature cache does (open_image)."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, (str, Path)):
        text = str(value)
        if Path(text).is_file():
            return open_image(text, draft_size)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise PredictionError(f"{where} is neither an existing image file nor base64 image bytes: {text[:80]!r}") from None
    else:
        raise PredictionError(f"{where} has type {type(value).__name__}; give a file path, bytes or a base64 string")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return load_rgb(image, draft_size)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise PredictionError(f"{where} holds bytes that are not a readable image ({type(exc).__name__}: {exc})") from None


# model and backbone ----------------------------------------------------------------------------


def read_model_meta(model_dir: Path) -> dict[str, Any]:
    info = Path(model_dir) / GENERATOR_JSON
    if not info.is_file():
        raise PredictionError(
            f"{model_dir} is not a trained AAPE model ({GENERATOR_JSON} missing); give a generator/seed{{S}} "
            f"directory written by `aape distill-generator`"
        )
    try:
        return json.loads(info.read_text())
    except json.JSONDecodeError as exc:
        raise PredictionError(f"{info} is not valid JSON ({exc}); retrain or restore the model") from None


def backbone_config_for(meta: dict[str, Any], params: Params, model_dir: Path) -> BackboneConfig:
    """The backbone the model was trained with (see the module docstring for the rule)."""
    identity = meta.get("backbone_identity")
    if not identity or "@" not in identity:
        raise PredictionError(f"{model_dir / GENERATOR_JSON} records no backbone_identity; retrain the model")
    name, weights = identity.split("@", 1)
    if weights == RANDOM_INIT_WEIGHTS:
        pretrained = RANDOM_INIT_WEIGHTS
    elif weights.startswith("tag:"):
        pretrained = weights[len("tag:"):]
    elif weights.startswith("file:"):
        pretrained = params.backbone.pretrained
        if not Path(pretrained).expanduser().is_file():
            file_name = weights.split(":")[1]
            raise PredictionError(
                f"model {model_dir} was trained on backbone {name} with weights from a checkpoint file "
                f"'{file_name}'; set backbone.pretrained to that file (now {pretrained!r})"
            )
    else:
        raise PredictionError(f"{model_dir / GENERATOR_JSON}: unrecognised backbone_identity {identity!r}; retrain")
    chosen = BackboneConfig(model=name, pretrained=pretrained, precision=params.backbone.precision, jpeg_draft=params.backbone.jpeg_draft)
    if (chosen.model, chosen.pretrained) != (params.backbone.model, params.backbone.pretrained):
        log.info("using the model's own backbone %s/%s (params.backbone says %s/%s)", chosen.model, chosen.pretrained,
                 params.backbone.model, params.backbone.pretrained)
    return chosen


def load_model_backbone(cfg: BackboneConfig, device: str, image_size: int | None = None):
    """Build the backbone (load_backbone draws random-init weights from a fixed seed, so they are
    the ones the model's features were extracted with)."""
    from aape.backbone import load_backbone

    if cfg.random_init:
        log.warning("RANDOM-INIT backbone: predictions are meaningless (no trained CLIP weights)")
    return load_backbone(cfg, device, image_size=image_size)


@dataclass
class Predictor:
    """A loaded backbone + AAPE model; classifies PIL images among any class names."""

    backbone: Any
    model: Any
    class_template: str
    batch_size: int
    model_dir: Path
    _text_cache: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def load(cls, model_dir: Path, params: Params) -> "Predictor":
        from aape.method.model import AAPEModel

        model_dir = Path(model_dir)
        meta = read_model_meta(model_dir)
        backbone = load_model_backbone(backbone_config_for(meta, params, model_dir), params.run.device, params.data.image_size)
        model = AAPEModel.load(model_dir, expect_identity=backbone.identity, expect_embed_dim=backbone.embed_dim,
                               device=backbone.device)
        template = meta.get("class_template") or params.features.class_template
        return cls(backbone, model, template, params.evaluation.batch_size, model_dir)

    def class_text(self, classnames: Sequence[str]) -> torch.Tensor:
        key = tuple(classnames)
        if key not in self._text_cache:
            texts = [self.class_template.format(name) for name in classnames]
            self._text_cache[key] = torch.cat(
                [self.backbone.encode_texts(texts[i : i + 256]) for i in range(0, len(texts), 256)]
            )
        return self._text_cache[key]

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.backbone.eval_transform(image) for image in images])
        return self.backbone.encode_images(pixels)

    @torch.inference_mode()
    def probabilities(self, image_features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        text = self.class_text(classnames).to(image_features.device)
        return self.model.logits(image_features, text).float().softmax(dim=-1).cpu()

    def top_k(self, images: Sequence[Image.Image], classnames: Sequence[str], k: int) -> list[tuple[list[str], list[float]]]:
        probs = self.probabilities(self.encode(images), classnames)
        values, indices = probs.topk(min(k, len(classnames)), dim=-1)
        return [([classnames[i] for i in row_idx.tolist()], [round(float(v), 6) for v in row_val])
                for row_val, row_idx in zip(values, indices)]


def predict_images(predictor: Predictor, named_images: Sequence[tuple[str, Any]], classnames: Sequence[str],
                   top_k: int, skip_unreadable: bool = False) -> list[Prediction]:
    """Classify (name, image source) pairs batch by batch; sources are paths, bytes or base64."""
    predictions: list[Prediction] = []
    skipped: list[str] = []
    size = predictor.batch_size
    batches = range(0, len(named_images), size)
    for start in progress(batches, desc="predict", total=len(batches), unit="batch"):
        names, images = [], []
        for name, source in named_images[start : start + size]:
            try:
                images.append(decode_image(source, name, predictor.backbone.draft_size))
                names.append(name)
            except (UnreadableImageError, PredictionError) as exc:
                if not skip_unreadable:
                    raise
                skipped.append(f"{name}: {exc}")
        if images:
            for name, (labels, probs) in zip(names, predictor.top_k(images, classnames, top_k)):
                predictions.append(Prediction(name, labels, probs))
    if skipped:
        log.warning("skipped %d unreadable image(s) (data.skip_unreadable):\n  %s", len(skipped), "\n  ".join(skipped))
    return predictions


def predict_paths(paths: list[Path], model_dir: Path, classnames: list[str], params: Params, top_k: int) -> list[Prediction]:
    """`aape predict`: image files and folders (recursively, sorted) -> top-k labels with probabilities."""
    classnames = validate_class_names(classnames)
    if top_k < 1:
        raise PredictionError(f"top_k must be at least 1, got {top_k}")
    files = collect_images(paths)
    predictor = Predictor.load(model_dir, params)
    log.info("classifying %d image(s) among %d class(es) with %s", len(files), len(classnames), model_dir)
    return predict_images(predictor, [(str(f), f) for f in files], classnames, top_k, params.data.skip_unreadable)


def write_or_print(predictions: Sequence[Prediction | dict], output_csv: str | None) -> None:
    """CSV (one row per image and rank: path, rank, class_name, probability) or a readable listing."""
    rows = [p.as_dict() if isinstance(p, Prediction) else dict(p) for p in predictions]
    if output_csv:
        target = Path(output_csv)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "rank", "class_name", "probability"])
            for row in rows:
                for rank, (label, prob) in enumerate(zip(row["labels"], row["probabilities"]), start=1):
                    writer.writerow([row["path"], rank, label, f"{prob:.6f}"])
        log.info("wrote %d prediction(s) to %s", len(rows), target.resolve())
        print(f"wrote {len(rows)} prediction(s) to {target.resolve()}", file=sys.stderr)
        return
    for row in rows:
        print(row["path"])
        width = max(len(label) for label in row["labels"])
        for rank, (label, prob) in enumerate(zip(row["labels"], row["probabilities"]), start=1):
            print(f"  {rank}. {label:<{width}}  {prob:.4f}")
