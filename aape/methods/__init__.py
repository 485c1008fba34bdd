"""The methods under evaluation: the registry (`registry.py`, data only) and one module per method.

    registry        METHODS: name -> MethodSpec (title, trainer stage, needs, settings, published numbers)
    context         MethodContext: what a method is built from (features, config, classes, backbone)
    clip_baselines  zero-shot, template ensemble, CuPL, linear probe
    aape_method     AAPE and its λ = 0 ablation (trained by distill-generator)
    coop            CoOp and KgCoOp (prompt_encoder: CLIP's text encoder with learnt context)
    cocoop          CoCoOp
    clip_adapter    CLIP-Adapter
    tip_adapter     Tip-Adapter-F
"""

from aape.methods.registry import METHODS, MethodSpec, method_names, method_spec, trained_by

__all__ = ["METHODS", "MethodSpec", "method_names", "method_spec", "trained_by"]
