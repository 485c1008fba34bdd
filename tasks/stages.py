"""One Prefect task per pipeline stage, each calling the same `aape.stages` function as the CLI and DVC."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from aape.config import Params
from aape.stages import STAGES, stage_function
from aape.tracking import run_stage_tracked

# LLM calls fail transiently (rate limits, timeouts): retry the stage; its journal makes a retry
# send only the requests that are still missing.
RETRIES = {"generate-prompts": 2}


def run_stage(name: str, params: Params, tracker: Any = None) -> dict[str, Any]:
    """Run stage `name`, in a nested tracking run when a tracker is given."""
    return run_stage_tracked(name, stage_function(name), params, tracker)


def _make_task(name: str):
    return task(
        run_stage,
        name=name,
        task_run_name=name,
        retries=RETRIES.get(name, 0),
        retry_delay_seconds=15,
        cache_policy=NO_CACHE,  # stages cache their own work on disk, keyed by content
    )


STAGE_TASKS = {name: _make_task(name) for name in STAGES}
