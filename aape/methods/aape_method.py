"""AAPE and its λ = 0 ablation as registry methods: trained by the distill-generator stage, scored
with the fast head on the class-name prompts (features.class_template)."""

from __future__ import annotations

from dataclasses import dataclass

from aape.evaluation.classifiers import ModelClassifier
from aape.methods.context import ClassText, MethodContext


@dataclass
class AAPEClassifier(ModelClassifier):
    def retarget(self, text: ClassText) -> "AAPEClassifier":
        return AAPEClassifier(self.name, self.model, text.prompts)


def build(ctx: MethodContext, method: str) -> AAPEClassifier:
    from aape.evaluation.protocols import load_aape

    return AAPEClassifier(method, load_aape(ctx.layout, method, ctx.seed, ctx.bundle, ctx.info), ctx.bundle.class_prompts)
