"""What every LLM source produces: journal entries, and counters of what a run sent and was billed."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from aape.prompts.journal import SampleJob

# Called with the finished entries of one response (or one batch); persists them before returning.
Persist = Callable[[list[dict[str, Any]]], None]


@dataclass(frozen=True)
class Sampling:
    """The sampling settings that, with the question, determine an answer."""

    temperature: float
    max_tokens: int


@dataclass
class RunStats:
    """What this run cost: requests sent (every attempt), retries and why, tokens billed."""

    requests: int = 0
    retries: int = 0
    answers: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retry_reasons: Counter = field(default_factory=Counter)
    retry_wait_s: float = 0.0

    def bill(self, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        self.prompt_tokens += prompt_tokens or 0
        self.completion_tokens += completion_tokens or 0


def make_entry(
    job: SampleJob,
    *,
    source: str,
    model: str,
    sampling: Sampling,
    raw_text: str,
    finish_reason: str | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    request_id: str | None,
) -> dict[str, Any]:
    """One journal line: the answer plus everything needed to rebuild its Parquet row."""
    return {
        "key": job.key,
        "source": source,
        "model": model,
        "class_name": job.class_name,
        "template": job.template,
        "sample_index": job.sample_index,
        "temperature": sampling.temperature,
        "max_tokens": sampling.max_tokens,
        "raw_text": raw_text,
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "request_id": request_id,
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
