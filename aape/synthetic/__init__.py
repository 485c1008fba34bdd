"""Synthetic embeddings that behave like CLIP's, for proving the method's behaviour without CLIP
weights: a world generator with named presets (`world`) and the proxy benchmark of every method on
it (`proxy`). Everything built here is synthetic and says so (docs/method.md, "The proxy benchmark")."""

from aape.synthetic.world import PRESETS, DescriptionKind, ProxyWorld, WorldSpec, make_world, preset

__all__ = ["PRESETS", "DescriptionKind", "ProxyWorld", "WorldSpec", "make_world", "preset"]
