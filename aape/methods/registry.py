"""The methods under evaluation, one entry each: what a method needs, how it trains, how it
classifies, its title, its colour and the numbers its authors published.

Everything that lists methods derives from `METHODS`: the choices of `evaluation.methods` and the
`baselines` section of params.yaml (aape/config.py), the stage that trains a method, the report's
rows and reference columns, the figures' colours, the MLflow runs and the tests' parametrisation.
Adding a method is one module (with `build`, and `train` when it learns something) plus one
entry here.

This module is data only (no torch): the config schema imports it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

# which stage trains a method
NO_TRAINING = "none"  # built from cached features alone (zero-shot, CuPL)
FIT_IN_EVALUATE = "evaluate"  # fitted in seconds inside the evaluate stage (the linear probe)
DISTILL_GENERATOR = "distill-generator"  # AAPE and its λ = 0 ablation
TRAIN_BASELINES = "train-baselines"  # the prompt learners and adapters (aape/stages/train_baselines.py)

# The protocol the published figures belong to: ViT-B/16, OpenAI weights, 16 shots, base-to-new,
# average over the 11 datasets (docs/method.md, "Reference numbers").
REFERENCE_SETTING = {"protocol": "base2new", "backbone": "ViT-B-16", "weights": "openai", "shots": 16}


@dataclass(frozen=True)
class Reference:
    base: str
    new: str
    H: str
    source: str


@dataclass(frozen=True)
class Setting:
    """One hyperparameter of a method: its type, published default and meaning (becomes a params.yaml key)."""

    type: Any
    default: Any
    description: str
    constraints: dict[str, Any] = field(default_factory=dict)  # pydantic Field constraints: ge, gt, le, ...


@dataclass(frozen=True)
class MethodSpec:
    name: str
    title: str
    colour: str
    build: str  # "module:function" (ctx: MethodContext) -> Classifier
    trainer: str = NO_TRAINING
    train: str | None = None  # "module:function" (ctx, directory, tracker) -> summary dict, for TRAIN_BASELINES
    text_encoder: bool = False  # runs CLIP's text encoder after feature extraction (in training or to score classes)
    unseen: str | None = None  # why it cannot score classes it never saw in training; None: it can
    reference: Reference | None = None
    settings: dict[str, Setting] = field(default_factory=dict)  # params.yaml `baselines.<key>` (TRAIN_BASELINES)
    schedule: dict[str, Any] | None = None  # its schedule's defaults (ScheduleConfig keys), TRAIN_BASELINES only

    @property
    def key(self) -> str:
        """Its section under params.yaml's `baselines`."""
        return self.name.replace("-", "_")

    @property
    def scores_unseen(self) -> bool:
        return self.unseen is None

    def builder(self) -> Callable[..., Any]:
        return _resolve(self.build)

    def trainer_function(self) -> Callable[..., Any]:
        if self.train is None:
            raise ValueError(f"method {self.name!r} has nothing to train")
        return _resolve(self.train)


def _resolve(path: str) -> Callable[..., Any]:
    module, _, function = path.partition(":")
    return getattr(importlib.import_module(module), function)


def _coop_settings(n_ctx: int = 4) -> dict[str, Setting]:
    return {
        "n_ctx": Setting(int, n_ctx, "learnt context vectors (with ctx_init: its word count)", {"ge": 1}),
        "ctx_init": Setting(str, "a photo of a", "words the context starts from ('' = random N(0, 0.02), CoOp's alternative)"),
        "class_specific": Setting(bool, False, "one context per class (CoOp's CSC); cannot score unseen classes"),
    }


_PAPER_TABLE = "AAPE Table 1 / CoCoOp Table 1 / KgCoOp Table 1 (11-dataset average)"

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "zeroshot", "CLIP zero-shot (one template per dataset)", "#7f7f7f", "aape.methods.clip_baselines:build_zeroshot",
            reference=Reference("69.34", "74.22", "71.70", _PAPER_TABLE),
        ),
        MethodSpec("zeroshot-ensemble", "CLIP zero-shot, template ensemble", "#bcbd22", "aape.methods.clip_baselines:build_ensemble"),
        MethodSpec(
            "cupl", "CuPL (mean of description embeddings)", "#17becf", "aape.methods.clip_baselines:build_cupl",
            reference=Reference("72.56", "74.22", "73.38", "AAPE Table 1"),
        ),
        MethodSpec(
            "linear-probe", "Linear probe (same shots)", "#8c564b", "aape.methods.clip_baselines:build_linear_probe",
            trainer=FIT_IN_EVALUATE, unseen="a linear probe has no weights for classes it never saw in training",
        ),
        MethodSpec(
            "coop", "CoOp (learnt context)", "#2ca02c", "aape.methods.coop:build", trainer=TRAIN_BASELINES,
            train="aape.methods.coop:train", text_encoder=True,
            reference=Reference("82.69", "63.22", "71.66", "CoCoOp Table 1"),
            settings=_coop_settings(), schedule={"preset": "coop", "epochs": "auto", "batch_size": 32},
        ),
        MethodSpec(
            "cocoop", "CoCoOp (image-conditioned context)", "#d62728", "aape.methods.cocoop:build", trainer=TRAIN_BASELINES,
            train="aape.methods.cocoop:train", text_encoder=True,
            reference=Reference("80.47", "71.69", "75.83", "CoCoOp Table 1"),
            settings={
                **{k: v for k, v in _coop_settings().items() if k != "class_specific"},
                "meta_reduction": Setting(int, 16, "meta-net hidden width = image feature width / this", {"ge": 1}),
                "memory_gb": Setting(float, 0.0, "memory the text-encoder activations may use; 0 = what the device reports free", {"ge": 0}),
            },
            schedule={"preset": "coop", "epochs": 10, "batch_size": 1},
        ),
        MethodSpec(
            "kgcoop", "KgCoOp (knowledge-guided CoOp)", "#9467bd", "aape.methods.coop:build", trainer=TRAIN_BASELINES,
            train="aape.methods.coop:train", text_encoder=True,
            reference=Reference("80.73", "73.60", "77.00", "KgCoOp Table 1"),
            settings={
                **{k: v for k, v in _coop_settings().items() if k != "class_specific"},
                "kg_weight": Setting(float, 8.0, "λ of the term pulling learnt class embeddings to the hand-written prompt's", {"ge": 0}),
            },
            schedule={"preset": "coop", "epochs": 100, "batch_size": 128},
        ),
        MethodSpec(
            "clip-adapter", "CLIP-Adapter (residual image adapter)", "#e377c2", "aape.methods.clip_adapter:build",
            trainer=TRAIN_BASELINES, train="aape.methods.clip_adapter:train",
            settings={
                "ratio": Setting(float, 0.2, "residual ratio α: α·adapter(x) + (1 − α)·x", {"ge": 0, "le": 1}),
                "reduction": Setting(int, 4, "adapter bottleneck = feature width / this", {"ge": 1}),
            },
            schedule={"preset": "coop", "lr": 1e-5, "epochs": 200, "batch_size": 32},
        ),
        MethodSpec(
            "tip-adapter-f", "Tip-Adapter-F (fine-tuned few-shot cache)", "#aec7e8", "aape.methods.tip_adapter:build",
            trainer=TRAIN_BASELINES, train="aape.methods.tip_adapter:train",
            unseen="Tip-Adapter's cache holds keys and labels of the training classes only",
            settings={
                "init_alpha": Setting(float | None, None, "cache weight α while fine-tuning; null = Tip-Adapter's value for the dataset", {"ge": 0}),
                "init_beta": Setting(float, 1.0, "sharpness β of the cache affinity exp(−β(1 − cos)) while fine-tuning", {"ge": 0}),
                "search_beta_max": Setting(float | None, None, "β is searched on validation over [0.1, this); null = the dataset's", {"gt": 0.1}),
                "search_alpha_max": Setting(float | None, None, "α is searched on validation over [0.1, this); null = the dataset's", {"gt": 0.1}),
                "search_beta_steps": Setting(int, 200, "β grid points (search_step[0] in Tip-Adapter's configs)", {"ge": 1}),
                "search_alpha_steps": Setting(int, 20, "α grid points (search_step[1])", {"ge": 1}),
            },
            schedule={"preset": "coop", "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01, "epochs": 20,
                      "warmup_epochs": 0, "batch_size": 256},
        ),
        MethodSpec(
            "aape-nodistill", "AAPE without distillation (λ = 0)", "#ff7f0e", "aape.methods.aape_method:build",
            trainer=DISTILL_GENERATOR,
        ),
        MethodSpec(
            "aape", "AAPE", "#1f77b4", "aape.methods.aape_method:build", trainer=DISTILL_GENERATOR,
            reference=Reference("> 84", "> 76", "80.97", "AAPE Table 1"),
        ),
    )
}

# Published rows of methods this project does not implement, shown in the report's reference table.
OTHER_REFERENCES: dict[str, Reference] = {
    "MaPLe": Reference("82.28", "75.14", "78.55", "MaPLe Table 1"),
    "PromptSRC": Reference("84.26", "76.10", "79.97", "PromptSRC Table 1"),
}


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; methods are: {', '.join(METHODS)}") from None


def trained_by(stage: str) -> tuple[str, ...]:
    return tuple(name for name, spec in METHODS.items() if spec.trainer == stage)
