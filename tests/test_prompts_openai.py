"""The OpenAI-compatible source against a real HTTP server on 127.0.0.1 that injects faults.

Every test checks the output is complete and correct: one row per planned answer, each text being
exactly what the server delivered for that request, and no request answered twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import pytest
from llm_stub_server import OVERLONG_CHARS, StubLLMServer, body_key, reply_text, stub_server  # noqa: F401 - fixture

from aape.config import dump_params, load_params
from aape.prompts import load_descriptions
from aape.prompts.errors import LLMError
from aape.prompts.journal import Journal
from aape.prompts.openai_source import retry_after_s
from aape.stages.generate_prompts import run
from aape.tracking import RecordingTracker

REPO_ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "AAPE_TEST_LLM_KEY"
SECRET = "sk-test-7f3a9c-never-on-disk"
CLASSES = ["AnnualCrop", "Forest", "Herbaceous_Vegetation"]


@pytest.fixture
def secret_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def make_params(tmp_path: Path, server: StubLLMServer, *extra: str, classes: list[str] = CLASSES, dataset: str = "eurosat"):
    data = tmp_path / "out" / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "classes.json").write_text(json.dumps({"dataset": dataset, "classnames": classes}))
    return load_params(None, [
        f"run.output_dir={tmp_path / 'out'}", f"run.cache_dir={tmp_path / 'cache'}", "tracking.enabled=false",
        "prompts.source=openai", f"prompts.openai.base_url={server.base_url}", f"prompts.openai.api_key_env={KEY_ENV}",
        "prompts.openai.model=stub-model", "prompts.max_templates=2", "prompts.n_per_template=2",
        "prompts.openai.concurrency=2", "prompts.openai.backoff_s=0.01", "prompts.openai.timeout_s=2", *extra,
    ])  # fmt: skip


def assert_complete_and_correct(tmp_path: Path, server: StubLLMServer, expected_rows: int) -> None:
    """One row per answer; each text is what the server delivered; nothing was answered twice."""
    frame = load_descriptions(tmp_path / "out" / "prompts" / "descriptions.parquet")
    assert len(frame) == expected_rows == server.total_answered
    assert all(n == 1 for n in server.answered.values()), "a request was answered twice"
    delivered = sorted(text for texts in server.replies.values() for text in texts)
    assert sorted(frame["text"]) == delivered
    for row in frame.itertuples():
        assert row.text.endswith(f"to: {row.template.replace('{}', row.class_name.replace('_', ' '))}")  # the right question
    assert frame.groupby("class_index").size().tolist() == [expected_rows // len(set(frame["class_index"]))] * len(set(frame["class_index"]))


def read_summary(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "prompts" / "summary.json").read_text())


def test_happy_path_rows_tokens_and_cost(tmp_path, stub_server, secret_key):
    stub_server.api_key = secret_key
    params = make_params(tmp_path, stub_server, "prompts.openai.price_per_1k_input_tokens=1.0", "prompts.openai.price_per_1k_output_tokens=2.0")
    out = run(params)
    assert_complete_and_correct(tmp_path, stub_server, 3 * 2 * 2)
    frame = load_descriptions(tmp_path / "out" / "prompts" / "descriptions.parquet")
    assert set(frame["source"]) == {"openai:stub-model"} and set(frame["temperature"]) == {0.99}
    assert sorted(frame["sample_index"].unique()) == [0, 1] and frame["request_id"].str.startswith("chatcmpl-stub-").all()
    assert (frame["completion_tokens"] == frame["text"].str.split().str.len()).all()  # the stub counts words
    summary = read_summary(tmp_path)
    prompt, completion = int(frame["prompt_tokens"].sum()), int(frame["completion_tokens"].sum())
    assert summary["tokens"] == {"prompt": prompt, "completion": completion, "total": prompt + completion}
    assert summary["tokens_this_run"] == summary["tokens"]
    assert summary["estimated_cost_usd"]["this_run"] == pytest.approx(prompt / 1000 * 1.0 + completion / 1000 * 2.0)
    assert summary["requests"] == {"planned": 12, "from_journal": 0, "sent": 12, "answers_received": 12, "retries": 0,
                                   "retry_reasons": {}, "retry_wait_s": 0.0}  # fmt: skip
    assert out["requests_sent"] == 12 and out["descriptions"] == 12
    assert set(stub_server.authorizations) == {f"Bearer {secret_key}"}  # the key was used ...


def test_api_key_never_reaches_disk_logs_or_tracking(tmp_path, stub_server, secret_key, caplog):
    stub_server.api_key = secret_key
    tracker = RecordingTracker()
    caplog.set_level("DEBUG")
    stub_server.add_fault("500", 1)
    run(make_params(tmp_path, stub_server), tracker=tracker)
    assert stub_server.total_answered == 12
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret_key.encode() not in path.read_bytes(), f"API key written to {path}"
    assert secret_key not in caplog.text
    assert secret_key not in repr((tracker.params, tracker.metrics, tracker.tags, tracker.artifacts))
    assert tracker.tags["prompts.source"] == "openai" and ("prompts/descriptions", 12.0, None) in tracker.metrics


def test_rerun_sends_nothing_and_more_samples_send_only_the_new_ones(tmp_path, stub_server, secret_key):
    params = make_params(tmp_path, stub_server)
    run(params)
    first = load_descriptions(tmp_path / "out" / "prompts" / "descriptions.parquet")
    out = run(params)
    assert out["requests_sent"] == 0 and out["answers_from_journal"] == 12 and stub_server.total_received == 12
    again = load_descriptions(tmp_path / "out" / "prompts" / "descriptions.parquet")
    assert again.equals(first)
    params.prompts.n_per_template = 3
    out = run(params)
    assert out["requests_sent"] == 3 * 2 and stub_server.total_received == 18
    assert all(n == 1 for n in stub_server.received.values())


@pytest.mark.parametrize(
    "fault, options, reason",
    [("429", {"retry_after": 0.3}, "rate_limit"), ("500", {}, "http_500"), ("slow", {"delay_s": 1.5}, "timeout"),
     ("malformed", {}, "malformed"), ("empty", {}, "empty")],
)  # fmt: skip
def test_faults_are_retried_and_the_output_is_complete(tmp_path, stub_server, secret_key, fault, options, reason):
    stub_server.add_fault(fault, count=3, **options)
    start = time.perf_counter()
    run(make_params(tmp_path, stub_server, "prompts.openai.timeout_s=0.5"))
    elapsed = time.perf_counter() - start
    assert_complete_and_correct(tmp_path, stub_server, 12)
    assert stub_server.faults_served[fault] == 3 and stub_server.total_received == 12 + 3
    summary = read_summary(tmp_path)
    assert summary["requests"]["retries"] == 3 and summary["requests"]["retry_reasons"] == {reason: 3}
    assert summary["requests"]["sent"] == 15
    if fault == "429":  # Retry-After is honoured: 0.3 s each, not the 0.01 s backoff
        assert summary["requests"]["retry_wait_s"] == pytest.approx(3 * 0.3)
        assert elapsed >= 0.3
    if fault == "empty":  # an empty answer is billed, so it counts in this run's tokens
        assert summary["tokens_this_run"]["prompt"] > summary["tokens"]["prompt"]


def test_giving_up_after_max_retries_keeps_the_answers_obtained(tmp_path, stub_server, secret_key):
    params = make_params(tmp_path, stub_server, "prompts.openai.max_retries=2", "prompts.openai.concurrency=1")
    stub_server.add_fault("500", count=3, after=5)
    with pytest.raises(LLMError) as err:
        run(params)
    message = str(err.value)
    assert "gave up" in message and "after 3 attempts" in message and "HTTP 500" in message and "class '" in message
    saved = Journal(tmp_path / "cache" / "prompts" / "journal.jsonl").load()
    assert len(saved) == 5 and not (tmp_path / "out" / "prompts" / "descriptions.parquet").exists()
    out = run(params)  # the server recovered: the rerun asks only for what is missing
    assert out["answers_from_journal"] == 5 and out["requests_sent"] == 7
    assert_complete_and_correct(tmp_path, stub_server, 12)


def test_retry_budget_is_a_clear_error(tmp_path, stub_server, secret_key):
    stub_server.add_fault("429", count=50, retry_after=5)
    # a 5 s Retry-After does not fit a 1 s budget: the run gives up without sleeping at all (0.0 s
    # waited), rather than sleeping past the budget; checked by what it says, not by a clock
    with pytest.raises(LLMError, match=r"retry budget spent \(0\.0s of waiting, prompts\.openai\.retry_budget_s=1\)"):
        run(make_params(tmp_path, stub_server, "prompts.openai.retry_budget_s=1"))


def test_rejected_key_is_fatal_and_names_the_variable_not_the_key(tmp_path, stub_server, secret_key):
    stub_server.api_key = "the-right-key"
    with pytest.raises(LLMError) as err:
        run(make_params(tmp_path, stub_server))
    assert KEY_ENV in str(err.value) and secret_key not in str(err.value) and "401" in str(err.value)
    assert stub_server.total_received <= 2  # no retries on a rejected key (one per worker at most)


def test_missing_key_for_openai_itself_is_a_clear_error(tmp_path, stub_server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    params = make_params(tmp_path, stub_server)
    params.prompts.openai.base_url = None
    with pytest.raises(LLMError, match=f"environment variable {KEY_ENV} is not set"):
        run(params)


def test_a_content_filtered_reply_is_reported_as_such_not_as_empty(tmp_path, stub_server, secret_key, caplog):
    # filtered replies are bad replies: retried like empty ones, then a clear error
    params = make_params(tmp_path, stub_server, "prompts.openai.max_retries=1", "prompts.openai.concurrency=1")
    stub_server.add_fault("content_filter", count=2)
    caplog.set_level("WARNING", logger="aape")
    with pytest.raises(LLMError) as err:
        run(params)
    retried = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retrying")]
    for message in [*retried, str(err.value)]:
        assert "finish_reason=content_filter" in message and "class 'AnnualCrop'" in message and "empty" not in message
    assert len(retried) == 1 and "question 'Describe how AnnualCrop looks" in str(err.value)


def test_an_overlong_reply_is_stored_capped_with_a_warning(tmp_path, stub_server, secret_key, caplog):
    stub_server.add_fault("overlong", count=1)  # the first request: class AnnualCrop, concurrency 1
    caplog.set_level("WARNING", logger="aape")
    run(make_params(tmp_path, stub_server, "prompts.max_tokens=50", "prompts.openai.concurrency=1"))
    saved = Journal(tmp_path / "cache" / "prompts" / "journal.jsonl").load()
    capped = [e for e in saved.values() if "It goes on" in e["raw_text"]]
    assert len(saved) == 12 and len(capped) == 1
    assert len(capped[0]["raw_text"]) == 50 * 8 and capped[0]["finish_reason"] == "length"
    frame = load_descriptions(tmp_path / "out" / "prompts" / "descriptions.parquet")
    text = frame.loc[frame["raw_text"] == capped[0]["raw_text"], "text"].item()
    assert text.endswith("It goes on and on.") and len(text) <= 400  # cut after its last full sentence
    warning = [r.getMessage() for r in caplog.records if "characters" in r.getMessage()]
    assert len(warning) == 1 and "class 'AnnualCrop'" in warning[0] and f"{OVERLONG_CHARS} characters" in warning[0]


def test_errors_from_the_source_are_not_chained_to_asyncio_internals(tmp_path, stub_server, secret_key):
    stub_server.api_key = "the-right-key"
    with pytest.raises(LLMError) as err:
        run(make_params(tmp_path, stub_server))
    shown = "".join(traceback.format_exception(err.value))
    assert "HTTP 401" in shown and "no running event loop" not in shown and err.value.__context__ is None


def test_retry_after_parsing():
    import httpx

    assert retry_after_s(httpx.Headers({"retry-after": "2"})) == 2.0
    assert retry_after_s(httpx.Headers({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after_s(httpx.Headers({"retry-after": date})) <= 31
    assert retry_after_s(httpx.Headers({})) is None


def _journal_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_killed_run_resumes_without_sending_any_answered_request_again(tmp_path, stub_server, secret_key, how):
    stub_server.api_key = secret_key
    classes = [f"class_{i}" for i in range(4)]
    params = make_params(tmp_path, stub_server, "prompts.n_per_template=4", "prompts.max_templates=3",
                         "prompts.openai.concurrency=4", classes=classes)  # fmt: skip
    params_file = tmp_path / "params.yaml"
    dump_params(params, params_file)
    journal = tmp_path / "cache" / "prompts" / "journal.jsonl"
    stub_server.hold_after(20)  # answer 20 of 48, then hold every request: the client is stuck mid-run
    env = {**os.environ, KEY_ENV: secret_key, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "aape.cli", "generate-prompts", "--params", str(params_file), "--no-track"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (_journal_lines(journal) == 20 and sum(stub_server.held.values()) == 4):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the client never reached the held state"
            time.sleep(0.05)
        proc.send_signal(how)
        output = proc.communicate(timeout=30)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    if how == signal.SIGINT:
        assert "rerun to resume" in output
    assert secret_key not in output
    assert len(Journal(journal).load()) == 20
    answered_before = set(stub_server.answered)
    # Measured against this snapshot: on a loaded machine the first run may itself retry a request
    # that outlived its 2 s timeout, which is the client's retry policy, not the resume under test.
    received_before = Counter(stub_server.received)
    stub_server.release()

    out = run(params)
    assert out["answers_from_journal"] == 20 and out["requests_sent"] == 28
    sent_by_resume = Counter(stub_server.received) - received_before
    assert not set(sent_by_resume) & answered_before, "an answered request was sent again"
    assert_complete_and_correct(tmp_path, stub_server, 48)
    assert set(stub_server.held) <= set(sent_by_resume)  # the held, never-answered requests went out again
    assert set(sent_by_resume) == set(stub_server.answered) - answered_before and len(sent_by_resume) == 28  # exactly the missing ones


def test_stub_keys_match_what_the_client_sends():
    body = {"model": "m", "messages": [{"role": "user", "content": "q"}], "seed": 1, "temperature": 0.5, "max_tokens": 5, "n": 1}
    assert body_key(body) == body_key(dict(reversed(list(body.items()))))
    assert reply_text(body) != reply_text({**body, "seed": 2}) and reply_text(body).endswith("to: q")
