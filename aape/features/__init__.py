"""Frozen CLIP features: extracted once, cached by what determines them, reused by every stage.

Readers call `load_bundle(layout, seed)`; the artifact format is described in `aape.features.bundle`
and in docs/architecture.md. Other stages encode extra images or texts through the same cache with
`image_features(...)` and `text_features(...)`.
"""

from aape.features.baseline_templates import BaselineTemplates, baseline_templates
from aape.features.bundle import FeatureBundle, FeatureError, load_bundle, read_index, split_file, text_file
from aape.features.extract import build_backbone
from aape.features.image_encoder import ImageFeatures, SkippedImage, image_features
from aape.features.text_encoder import class_template_features, text_features

__all__ = [
    "BaselineTemplates",
    "FeatureBundle",
    "baseline_templates",
    "build_backbone",
    "FeatureError",
    "ImageFeatures",
    "SkippedImage",
    "class_template_features",
    "image_features",
    "load_bundle",
    "read_index",
    "split_file",
    "text_features",
    "text_file",
]
