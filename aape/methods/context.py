"""What a method is built from: one seed's cached features, the run's configuration and classes,
and (loaded only when a method asks) the frozen backbone whose text encoder the CoOp family runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch

from aape.config import Params
from aape.data.manifests import ClassesManifest
from aape.features import FeatureBundle
from aape.layout import Layout
from aape.methods.errors import MethodError
from aape.methods.registry import method_spec


@dataclass
class ClassText:
    """A label space as the methods see it: class names and their cached text embeddings."""

    names: list[str]
    prompts: torch.Tensor  # [C, d] features.class_template ("a photo of a {}."): AAPE's
    zeroshot: torch.Tensor | None = None  # [C, d] the zero-shot baseline's template (CoOp's hand-written one)
    ensemble: torch.Tensor | None = None  # [C, d] the template ensemble's mean
    dataset: str = ""

    def hand_written(self) -> torch.Tensor:
        """The hand-written prompt per class (the zero-shot template; AAPE's template when none was cached)."""
        return self.zeroshot if self.zeroshot is not None else self.prompts


def bundle_text(bundle: FeatureBundle, info: ClassesManifest) -> ClassText:
    return ClassText(list(info.classnames), bundle.class_prompts, bundle.class_zeroshot, bundle.class_ensemble, info.dataset)


@dataclass
class MethodContext:
    params: Params
    layout: Layout
    info: ClassesManifest
    bundle: FeatureBundle
    backbone_loader: Callable[[], Any] | None = None  # () -> aape.backbone.Backbone
    _backbone: Any = field(default=None, repr=False)

    @property
    def seed(self) -> int:
        return self.bundle.seed

    @property
    def text(self) -> ClassText:
        return bundle_text(self.bundle, self.info)

    @property
    def train_classes(self) -> list[int]:
        return list(self.info.train_classes)

    def settings(self, method: str) -> Any:
        """params.yaml's `baselines.<method>` section."""
        return getattr(self.params.baselines, method_spec(method).key)

    def directory(self, method: str) -> Path:
        return self.layout.baseline_dir(method, self.seed)

    @cached_property
    def inputs(self):
        """The seed's training set in local labels (aape.method.inputs.SeedInputs), from this bundle."""
        from aape.method.inputs import seed_inputs

        return seed_inputs(self.bundle, self.info)

    def backbone(self):
        """The frozen backbone the features were extracted with (loaded once, on first use)."""
        if self._backbone is None:
            if self.backbone_loader is None:
                raise MethodError("this method runs CLIP's text encoder, but no backbone was provided to build it")
            backbone = self.backbone_loader()
            if backbone.identity != self.bundle.identity:
                raise MethodError(
                    f"backbone {backbone.identity!r} (params.backbone) is not the one the features were extracted with "
                    f"({self.bundle.identity!r}); set backbone.model/pretrained back, or re-run from extract-features"
                )
            self._backbone = backbone
        return self._backbone


def backbone_loader(params: Params) -> Callable[[], Any]:
    """() -> the configured backbone, loaded on the first call and shared by every later one (seeds, methods)."""
    loaded: list[Any] = []

    def load():
        if not loaded:
            from aape.backbone import load_backbone

            loaded.append(load_backbone(params.backbone, params.run.device, image_size=params.data.image_size))
        return loaded[0]

    return load
