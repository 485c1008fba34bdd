"""The AAPE method on cached CLIP features: aggregator, prompt generator h, classifier head g,
their training, and their checkpoints (docs/method.md)."""

from aape.labels import to_local
from aape.method.aggregator import (
    VARIANTS,
    Aggregator,
    AttentionAggregator,
    NoAttentionError,
    build_aggregator,
    clip_reward,
    load_aggregator,
    save_aggregator,
)
from aape.method.checkpoint import CheckpointError, CheckpointMismatchError
from aape.method.descriptions import DescriptionBank, MissingDescriptionsError
from aape.method.model import AAPEModel, ClassifierHead, PromptGenerator
from aape.method.objectives import TrainingSet, compute_summaries, seeded, summarize_images, train_aggregator, train_generator
from aape.method.training import FitResult, NonFiniteLossError, epoch_draw, fit

__all__ = [
    "AAPEModel",
    "Aggregator",
    "AttentionAggregator",
    "CheckpointError",
    "CheckpointMismatchError",
    "ClassifierHead",
    "DescriptionBank",
    "FitResult",
    "MissingDescriptionsError",
    "NoAttentionError",
    "NonFiniteLossError",
    "PromptGenerator",
    "TrainingSet",
    "VARIANTS",
    "build_aggregator",
    "clip_reward",
    "compute_summaries",
    "epoch_draw",
    "fit",
    "load_aggregator",
    "save_aggregator",
    "seeded",
    "summarize_images",
    "to_local",
    "train_aggregator",
    "train_generator",
]
