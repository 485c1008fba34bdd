"""A stub OpenAI-compatible chat-completions server on 127.0.0.1, for tests and benchmarks.

It speaks enough of the protocol for the `openai` client (POST /v1/chat/completions, GET
/v1/models), answers deterministically, counts requests per request body, and injects faults on
demand: 429 with Retry-After, 500, replies slower than the client's timeout, malformed JSON, empty
content, a reply stopped by the content filter, a reply far longer than max_tokens allows, and
holding requests unanswered (to kill a client mid-run).

    with StubLLMServer(latency_s=0.2) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        server.add_fault("429", count=2, retry_after=0.1)
        ...
        server.received   # Counter: body key -> requests received
        server.answered   # Counter: body key -> complete answers delivered
        server.replies    # body key -> the answer texts delivered

Run standalone for manual tests: python tests/llm_stub_server.py --port 8000 --latency 0.2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULT_KINDS = ("429", "500", "slow", "malformed", "empty", "content_filter", "overlong")
OVERLONG_CHARS = 100_000


def body_key(body: dict[str, Any]) -> str:
    """What identifies a request: model, messages, seed and sampling parameters."""
    fields = {k: body.get(k) for k in ("model", "messages", "seed", "temperature", "max_tokens", "n")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def reply_text(body: dict[str, Any], choice: int = 0) -> str:
    """The deterministic answer to a request: names the question, differs per seed and choice."""
    question = next((m.get("content", "") for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
    digest = hashlib.sha256(f"{body_key(body)}:{choice}".encode()).hexdigest()[:10]
    return f"Stub answer {digest} to: {question}"


def _count_words(text: str) -> int:
    return len(text.split())


@dataclass
class Fault:
    kind: str
    retry_after: float | None = None
    delay_s: float = 0.0
    not_before: int = 0  # served only once this many requests have been received in total


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # the default backlog of 5 drops connections at high concurrency

    stub: "StubLLMServer"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence per-request logs
        pass

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/").endswith("/stats"):  # for a client in another process
            stub = self.server.stub
            self._send_json(200, {"received": stub.total_received, "answered": stub.total_answered, "faults": dict(stub.faults_served)})
        elif self.path.rstrip("/").endswith("/models"):
            self._send_json(200, {"object": "list", "data": [{"id": "stub-model", "object": "model", "owned_by": "stub"}]})
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:  # noqa: N802
        stub = self.server.stub
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        if stub.api_key is not None and self.headers.get("Authorization") != f"Bearer {stub.api_key}":
            self._send_json(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._send_json(400, {"error": {"message": "request body is not JSON", "type": "invalid_request_error"}})
            return
        key = body_key(body)
        fault, hold = stub._admit(key, self.headers)
        if hold:
            stub._release_event.wait()
            self.close_connection = True  # never answered: the client was meant to die meanwhile
            return
        if stub.latency_s:
            time.sleep(stub.latency_s)
        if fault is None:
            self._answer(stub, key, body)
        elif fault.kind == "429":
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
            self._send_json(429, {"error": {"message": "rate limited (stub)", "type": "rate_limit_exceeded"}}, headers)
        elif fault.kind == "500":
            self._send_json(500, {"error": {"message": "internal error (stub)", "type": "server_error"}})
        elif fault.kind == "slow":
            time.sleep(fault.delay_s)
            try:
                self._answer(stub, key, body, count=False)  # the client has given up by now
            except OSError:
                pass
        elif fault.kind == "malformed":
            self._send_raw(200, b'{"id": "chatcmpl-broken", "choices": [{"index": 0, "message": {"content": "cut sh')
        elif fault.kind == "empty":
            self._send_json(200, _completion(body, [""], key))
        elif fault.kind == "content_filter":  # what Azure OpenAI sends: no content at all
            self._send_json(200, _completion(body, [None], key, finish_reason="content_filter"))
        elif fault.kind == "overlong":  # a server ignoring max_tokens: a real answer, then rambling
            self._send_json(200, _completion(body, [overlong_text(body)], key))

    def _answer(self, stub: "StubLLMServer", key: str, body: dict[str, Any], count: bool = True) -> None:
        texts = [reply_text(body, i) for i in range(int(body.get("n") or 1))]
        self._send_json(200, _completion(body, texts, key))
        if count:
            stub._delivered(key, texts)

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send_raw(status, json.dumps(payload).encode(), headers)

    def _send_raw(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()


def overlong_text(body: dict[str, Any]) -> str:
    """The normal answer, then full sentences up to OVERLONG_CHARS characters."""
    text = reply_text(body)
    text += "" if text.endswith((".", "?", "!")) else "."
    filler = " It goes on and on."
    return (text + filler * (OVERLONG_CHARS // len(filler)))[:OVERLONG_CHARS]


def _completion(body: dict[str, Any], texts: list[str | None], key: str, finish_reason: str = "stop") -> dict[str, Any]:
    prompt_tokens = sum(_count_words(str(m.get("content", ""))) for m in body.get("messages", []))
    completion_tokens = sum(_count_words(t or "") for t in texts)
    return {
        "id": f"chatcmpl-stub-{key[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "stub-model"),
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": finish_reason} for i, t in enumerate(texts)
        ],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    }


class StubLLMServer:
    """A chat-completions server on 127.0.0.1 and a free port, run in a background thread."""

    def __init__(self, latency_s: float = 0.0, api_key: str | None = None, port: int = 0) -> None:
        self.latency_s = latency_s
        self.api_key = api_key
        self._port = port
        self._lock = threading.Lock()
        self._faults: deque[Fault] = deque()
        self._answer_limit: int | None = None
        self._pending = 0  # admitted for an answer but not yet delivered (so hold_after counts exactly)
        self._release_event = threading.Event()
        self.received: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.held: Counter[str] = Counter()
        self.faults_served: Counter[str] = Counter()
        self.replies: dict[str, list[str]] = {}
        self.authorizations: list[str] = []
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> "StubLLMServer":
        self._httpd = _Server(("127.0.0.1", self._port), _Handler)
        self._httpd.stub = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release_event.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "StubLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # behaviour -------------------------------------------------------------------------------
    def add_fault(self, kind: str, count: int = 1, retry_after: float | None = None, delay_s: float = 0.0, after: int = 0) -> None:
        """`count` requests (in arrival order, starting `after` requests from now) get this fault instead
        of an answer. Faults queue up: one added later is served after the earlier ones."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; choose from {FAULT_KINDS}")
        with self._lock:
            start = self.total_received + after
            self._faults.extend(Fault(kind, retry_after, delay_s, start) for _ in range(count))

    def hold_after(self, answers: int) -> None:
        """Answer `answers` more requests, then hold every later one unanswered until release()."""
        with self._lock:
            self._answer_limit = sum(self.answered.values()) + answers
            self._release_event.clear()

    def release(self) -> None:
        """Drop the held requests (closing their connections unanswered) and answer normally again."""
        with self._lock:
            self._answer_limit = None
        self._release_event.set()

    @property
    def total_received(self) -> int:
        return sum(self.received.values())

    @property
    def total_answered(self) -> int:
        return sum(self.answered.values())

    def _admit(self, key: str, headers: Any) -> tuple[Fault | None, bool]:
        with self._lock:
            self.received[key] += 1
            self.authorizations.append(headers.get("Authorization", ""))
            if self._answer_limit is not None:
                in_flight = sum(self.answered.values()) + self._pending
                if in_flight >= self._answer_limit:
                    self.held[key] += 1
                    return None, True
            # the current request is number total_received - 1 (counted above)
            due = self._faults and self._faults[0].not_before <= self.total_received - 1
            fault = self._faults.popleft() if due else None
            if fault is not None:
                self.faults_served[fault.kind] += 1
            else:
                self._pending += 1
            return fault, False

    def _delivered(self, key: str, texts: list[str]) -> None:
        with self._lock:
            self._pending -= 1
            self.answered[key] += 1
            self.replies.setdefault(key, []).extend(texts)


try:  # a fixture for tests that import it: `from llm_stub_server import stub_server`
    import pytest

    @pytest.fixture
    def stub_server():
        """A fresh stub server on 127.0.0.1 (free port), stopped after the test."""
        with StubLLMServer() as server:
            yield server

except ImportError:  # standalone use without pytest
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each reply")
    parser.add_argument("--api-key", default=None, help="require this bearer key")
    args = parser.parse_args()
    server = StubLLMServer(latency_s=args.latency, api_key=args.api_key, port=args.port).start()
    print(f"stub chat-completions server at {server.base_url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
