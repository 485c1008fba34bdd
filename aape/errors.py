"""The root of the library's errors, and how an entry point reports them.

Every error the library raises on purpose derives from `AAPEError` (keeping its builtin base, e.g.
ValueError, for callers that catch that): the message names the culprit (key, file, class) and
`hint`, when given, says what to do. Entry points (the `aape` CLI and so every DVC stage,
`python -m flows.pipeline`) print such an error in a line or two: its traceback would only push the
message off the screen. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
import traceback
from contextlib import contextmanager
from typing import Iterator


class AAPEError(Exception):
    """An anticipated failure: bad input or configuration, a service that refused, a missing file."""

    exit_code = 1  # of a command that stops on it; ConfigError says 2, as click does for bad usage

    def __init__(self, *args: object, hint: str | None = None) -> None:
        super().__init__(*args)
        self.hint = hint  # kept by pickling too: BaseException pickles the instance __dict__

    @property
    def message(self) -> str:
        return str(self)


def describe(exc: AAPEError) -> str:
    """`error: <message>`, and `hint: <hint>` on a second line when there is one."""
    text = f"error: {exc.message}"
    return f"{text}\nhint: {exc.hint}" if exc.hint else text


@contextmanager
def report_errors() -> Iterator[None]:
    """Turn an AAPEError into `describe(...)` on stderr and its exit status; the traceback comes
    first only when the 'aape' logger is at DEBUG (the CLI's `--log-level DEBUG`)."""
    try:
        yield
    except AAPEError as exc:
        if logging.getLogger("aape").isEnabledFor(logging.DEBUG):
            traceback.print_exc(file=sys.stderr)
        print(describe(exc), file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
