"""Answers from any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, llama.cpp's server).

Requests run concurrently (at most `concurrency` in flight), one answer per request with a
per-sample `seed`. Rate limits (429, honouring Retry-After), server errors, timeouts, malformed
JSON, empty answers and answers withheld by a content filter are retried with exponential backoff;
each request has at most `max_retries` retries and the whole run at most `retry_budget_s` seconds
of waiting. Every answer is persisted the moment it arrives. The API key is read from the
environment and handed to the client only: it is never logged, stored or put in an error message.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
from typing import Any, Awaitable, Callable

import httpx
import openai

from aape.config import OpenAIEndpointConfig
from aape.logs import progress
from aape.prompts.answers import Persist, RunStats, Sampling, make_entry
from aape.prompts.errors import LLMError
from aape.prompts.journal import SampleJob, seed_from_key

log = logging.getLogger(__name__)

BACKOFF_CAP_S = 30.0
NO_KEY_PLACEHOLDER = "not-needed"  # self-hosted servers often accept any key


class _Retryable(Exception):
    """A failure worth another attempt; `wait_s` is the server's Retry-After when it sent one."""

    def __init__(self, reason: str, detail: str, wait_s: float | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.wait_s = wait_s


class RetryBudget:
    """Wall-clock seconds during which at least one request waits to retry (overlapping waits count once)."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self._spent = 0.0
        self._waiting = 0
        self._since = 0.0

    def spent(self) -> float:
        return self._spent + (time.monotonic() - self._since if self._waiting else 0.0)

    def allows(self, wait_s: float) -> bool:
        return self.spent() + wait_s <= self.budget_s

    async def wait(self, wait_s: float) -> None:
        if self._waiting == 0:
            self._since = time.monotonic()
        self._waiting += 1
        try:
            await asyncio.sleep(wait_s)
        finally:
            self._waiting -= 1
            if self._waiting == 0:
                self._spent += time.monotonic() - self._since


def api_key_from_env(cfg: OpenAIEndpointConfig) -> str:
    """The key from the environment variable named in config (never from a file, never logged)."""
    key = os.environ.get(cfg.api_key_env, "")
    if key:
        return key
    if cfg.base_url is None:
        raise LLMError(
            f"environment variable {cfg.api_key_env} is not set: export your OpenAI API key there, or name "
            "another variable in prompts.openai.api_key_env (the key is never read from params.yaml)"
        )
    log.warning("environment variable %s is not set: sending no API key to %s", cfg.api_key_env, cfg.base_url)
    return NO_KEY_PLACEHOLDER


def make_client(cfg: OpenAIEndpointConfig, api_key: str) -> openai.AsyncOpenAI:
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    return openai.AsyncOpenAI(
        base_url=cfg.base_url,
        api_key=api_key,
        max_retries=0,  # retries are ours: budgeted, logged, honouring Retry-After
        timeout=cfg.timeout_s,
        http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=cfg.timeout_s),
    )


def retry_after_s(headers: httpx.Headers | None) -> float | None:
    """Seconds from 'retry-after-ms', or 'Retry-After' as seconds or an HTTP date."""
    if headers is None:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def _classify(exc: BaseException, cfg: OpenAIEndpointConfig) -> _Retryable | LLMError:
    """Which failures deserve a retry, and a clear fatal error for the rest."""
    where = cfg.base_url or "api.openai.com"
    if isinstance(exc, openai.APITimeoutError):
        return _Retryable("timeout", f"no reply within {cfg.timeout_s:g}s (prompts.openai.timeout_s)")
    if isinstance(exc, openai.APIConnectionError):
        return _Retryable("connection", f"cannot reach {where}: {exc.__cause__ or exc}")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 429:
            return _Retryable("rate_limit", f"HTTP 429 rate limited: {exc.message}", retry_after_s(exc.response.headers))
        if status >= 500 or status in (408, 409):
            return _Retryable(f"http_{status}", f"HTTP {status}: {exc.message}", retry_after_s(exc.response.headers))
        if status in (401, 403):
            return LLMError(
                f"{where} rejected the API key (HTTP {status}): check the key in environment variable "
                f"{cfg.api_key_env} (prompts.openai.api_key_env)"
            )
        if status == 404:
            return LLMError(
                f"{where} answered 404 for model '{cfg.model}': check prompts.openai.model and prompts.openai.base_url "
                f"(it usually ends in /v1). Server said: {exc.message}"
            )
        return LLMError(f"{where} refused the request (HTTP {status}): {exc.message}. Check prompts.openai settings")
    if isinstance(exc, (json.JSONDecodeError, openai.APIResponseValidationError)):
        return _Retryable("malformed", f"malformed reply (not a chat completion): {exc}")
    if isinstance(exc, ValueError):
        return _Retryable("malformed", f"unreadable reply: {exc}")
    raise exc


class _GroupCommit:
    """Persist answers from many coroutines off the event loop, one write + fsync per group.

    A slow disk (an fsync can take milliseconds) must not stall the event loop for every answer.
    Answers that arrive while a write is in progress go together in the next one; each coroutine
    resumes only once its answer is on disk.
    """

    def __init__(self, persist: Persist) -> None:
        self._persist = persist
        self._pending: list[tuple[dict[str, Any], asyncio.Future]] = []
        self._flushing: asyncio.Task | None = None

    async def add(self, entry: dict[str, Any]) -> None:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((entry, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                group, self._pending = self._pending, []
                try:
                    await asyncio.to_thread(self._persist, [entry for entry, _ in group])
                except Exception as exc:  # noqa: BLE001 - handed to every waiting coroutine
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for _, future in group:
                        if not future.done():
                            future.set_result(None)
        finally:
            self._flushing = None


def _backoff_s(cfg: OpenAIEndpointConfig, attempt: int) -> float:
    """Exponential with jitter, so a burst of failures does not retry in lockstep."""
    return min(BACKOFF_CAP_S, cfg.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)


def _no_content(finish_reason: str | None) -> _Retryable:
    """A reply without text; a content filter says so in finish_reason, and that is what to report."""
    if finish_reason == "content_filter":
        return _Retryable("content_filter", "the reply was withheld by the server's content filter (finish_reason=content_filter)")
    return _Retryable("empty", f"the reply has empty content (finish_reason={finish_reason})")


async def _request_once(
    client: openai.AsyncOpenAI, cfg: OpenAIEndpointConfig, system: str, job: SampleJob, sampling: Sampling, stats: RunStats
) -> dict[str, Any]:
    stats.requests += 1
    raw = await client.chat.completions.with_raw_response.create(
        model=cfg.model,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": job.question}],
        temperature=sampling.temperature,
        max_tokens=sampling.max_tokens,
        seed=seed_from_key(job.key),
        n=1,
    )
    completion = raw.parse()
    if not hasattr(completion, "choices"):
        raise _Retryable("malformed", f"reply is not a chat completion: {str(completion)[:200]!r}")
    usage = getattr(completion, "usage", None)
    prompt_tokens = getattr(usage, "prompt_tokens", None)
    completion_tokens = getattr(usage, "completion_tokens", None)
    stats.bill(prompt_tokens, completion_tokens)  # billed even when the answer turns out empty
    choice = completion.choices[0] if completion.choices else None
    content = choice.message.content if choice is not None and choice.message is not None else None
    if not content or not content.strip():
        raise _no_content(choice.finish_reason if choice is not None else None)
    return make_entry(
        job,
        source=f"openai:{cfg.model}",
        model=cfg.model,
        sampling=sampling,
        raw_text=content,
        finish_reason=choice.finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        request_id=completion.id or raw.headers.get("x-request-id"),
    )


async def _answer_with_retries(
    request: Callable[[], Awaitable[dict[str, Any]]],
    job: SampleJob,
    cfg: OpenAIEndpointConfig,
    budget: RetryBudget,
    stats: RunStats,
    stop: asyncio.Event,
) -> dict[str, Any] | None:
    """The entry, or None when the run is stopping; raises LLMError when this request gives up."""
    attempt = 0
    while not stop.is_set():
        try:
            return await request()
        except _Retryable as exc:
            failure: _Retryable | LLMError = exc
        except Exception as exc:  # noqa: BLE001 - classified right below, unknown ones re-raised
            failure = _classify(exc, cfg)
        if isinstance(failure, LLMError):
            raise failure
        wait_s = failure.wait_s if failure.wait_s is not None else _backoff_s(cfg, attempt)
        where = f"class '{job.class_name}', question {job.question!r}, sample {job.sample_index}"
        if attempt >= cfg.max_retries:
            raise LLMError(f"gave up on {where} after {attempt + 1} attempts (prompts.openai.max_retries={cfg.max_retries}); last error: {failure.detail}")
        if not budget.allows(wait_s):
            raise LLMError(
                f"retry budget spent ({budget.spent():.1f}s of waiting, prompts.openai.retry_budget_s={cfg.retry_budget_s:g}); "
                f"last error on {where}: {failure.detail}"
            )
        attempt += 1
        stats.retries += 1
        stats.retry_reasons[failure.reason] += 1
        stats.retry_wait_s += wait_s
        if stats.retry_reasons[failure.reason] == 1:  # once per kind: a 429 storm must not flood the log
            log.warning("retrying (%s) %s in %.2fs: %s; further retries are counted in summary.json", failure.reason, where, wait_s, failure.detail)
        else:
            log.debug("retry %d for %s in %.2fs: %s", attempt, where, wait_s, failure.detail)
        await budget.wait(wait_s)
    return None


async def _answer_all(jobs: list[SampleJob], cfg: OpenAIEndpointConfig, system: str, sampling: Sampling, persist: Persist, stats: RunStats) -> None:
    client = make_client(cfg, api_key_from_env(cfg))
    budget = RetryBudget(cfg.retry_budget_s)
    stop = asyncio.Event()
    pending = iter(jobs)
    failures: list[BaseException] = []
    journal = _GroupCommit(persist)
    ticker = progress(range(len(jobs)), desc=f"answers from {cfg.model}", unit="answer")

    async def worker() -> None:
        for job in pending:
            if stop.is_set():
                return
            try:
                entry = await _answer_with_retries(
                    lambda job=job: _request_once(client, cfg, system, job, sampling, stats), job, cfg, budget, stats, stop
                )
            except Exception as exc:  # noqa: BLE001 - stop the others, let their answers land, re-raise below
                failures.append(exc)
                stop.set()
                return
            if entry is None:
                return
            await journal.add(entry)
            stats.answers += 1
            next(ticker, None)

    try:
        await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, len(jobs)))))
    finally:
        ticker.close()  # type: ignore[attr-defined]
        await client.close()
    if failures:
        raise failures[0]


def answer_jobs_openai(jobs: list[SampleJob], cfg: OpenAIEndpointConfig, system: str, sampling: Sampling, persist: Persist) -> RunStats:
    """Obtain one answer per job from the endpoint, persisting each as it arrives."""
    stats = RunStats()
    if jobs:
        _run_coroutine(_answer_all(jobs, cfg, system, sampling, persist, stats))
    return stats


def _loop_is_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _run_coroutine(coro: Awaitable[None]) -> None:
    """asyncio.run, also from code that already runs an event loop (a notebook): then in a thread."""
    # Decided outside the except block: run inside it, every error of the run would show
    # "RuntimeError: no running event loop" as its context, first in the traceback.
    if not _loop_is_running():
        asyncio.run(coro)  # type: ignore[arg-type]
        return
    failure: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            failure.append(exc)

    import threading

    thread = threading.Thread(target=target, name="aape-llm-requests")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
