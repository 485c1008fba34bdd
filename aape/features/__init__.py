"""Frozen CLIP features: extracted once, cached by what determines them, reused by every stage.

Readers call `load_bundle(layout, seed)`; the artifact format is described in `aape.features.bundle`
and in docs/architecture.md.
"""

from aape.features.bundle import FeatureBundle, FeatureError, load_bundle, read_index, split_file, text_file

__all__ = ["FeatureBundle", "FeatureError", "load_bundle", "read_index", "split_file", "text_file"]
