"""What every LLM source produces: journal entries, and counters of what a run sent and was billed."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from aape.prompts.journal import SampleJob

log = logging.getLogger(__name__)

# Called with the finished entries of one response (or one batch); persists them before returning.
Persist = Callable[[list[dict[str, Any]]], None]

# A misbehaving server or a model ignoring max_tokens can send a reply of any length; a token is a
# few characters, so 8 per token allowed keeps every honest reply whole and caps the rest. The
# floor keeps short replies of a tiny max_tokens whole however long their tokens are.
CAP_CHARS_PER_TOKEN = 8
MIN_CAP_CHARS = 256


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


def reply_cap_chars(max_tokens: int) -> int:
    return max(MIN_CAP_CHARS, max_tokens * CAP_CHARS_PER_TOKEN)


def cap_reply(job: SampleJob, sampling: Sampling, text: str, finish_reason: str | None) -> tuple[str, str | None]:
    """The reply cut to `reply_cap_chars`, then marked as stopped by length (so cleaning cuts it
    after its last full sentence); a reply within the cap is returned as it is."""
    cap = reply_cap_chars(sampling.max_tokens)
    if len(text) <= cap:
        return text, finish_reason
    log.warning(
        "reply for class '%s', question %r, sample %d is %d characters although prompts.max_tokens=%d: "
        "storing its first %d (the server or model ignores max_tokens)",
        job.class_name, job.question, job.sample_index, len(text), sampling.max_tokens, cap,
    )  # fmt: skip
    return text[:cap], "length"


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
    """One journal line: the answer (capped) plus everything needed to rebuild its Parquet row."""
    raw_text, finish_reason = cap_reply(job, sampling, raw_text, finish_reason)
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
