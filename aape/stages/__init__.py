"""Stage entry points: the one implementation of each pipeline stage.

Each stage module exposes `run(params: Params, tracker: Tracker | None = None) -> dict` that reads
its inputs from, and writes its outputs to, the paths in `aape.layout.Layout`, and returns a summary
dict (at least {"outputs": [paths...]}, plus headline figures). The CLI, the Prefect tasks and the
DVC stages all call these functions and nothing else.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

# stage name (as on the CLI and in dvc.yaml) -> module under aape.stages, in pipeline order
STAGES: dict[str, str] = {
    "prepare-data": "prepare_data",
    "generate-prompts": "generate_prompts",
    "extract-features": "extract_features",
    "train-aggregator": "train_aggregator",
    "distill-generator": "distill_generator",
    "train-baselines": "train_baselines",
    "evaluate": "evaluate",
}


def stage_function(name: str) -> Callable[..., dict[str, Any]]:
    if name not in STAGES:
        raise KeyError(f"unknown stage '{name}'; stages are: {', '.join(STAGES)}")
    module = importlib.import_module(f"aape.stages.{STAGES[name]}")
    return module.run
