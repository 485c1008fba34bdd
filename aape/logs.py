"""Logging a person can follow: stage banners with timings, delayed progress bars, output lists."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
log = logging.getLogger("aape")


def setup_logging(level: str | int = "INFO") -> None:
    """Idempotent: one stderr handler on the 'aape' logger, timestamps, no duplicate lines."""
    # Libraries that log through the root logger (open_clip's logging.warning) would otherwise make
    # Python add a root handler on the fly, and every aape line would then print twice.
    if not logging.getLogger().handlers:
        logging.getLogger().addHandler(logging.NullHandler())
    root = logging.getLogger("aape")
    root.setLevel(level)
    if not any(getattr(h, "_aape", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
        handler._aape = True  # type: ignore[attr-defined]
        root.addHandler(handler)


@contextmanager
def stage(name: str, logger: logging.Logger = log) -> Iterator[dict]:
    """Banner at start and end of a stage, with its wall time; yields a dict for extra summary lines."""
    bar = "=" * 72
    logger.info("%s\n  STAGE %s\n%s", bar, name, bar)
    summary: dict = {"outputs": []}
    start = time.perf_counter()
    try:
        yield summary
    except BaseException:
        logger.error("stage %s FAILED after %.1fs", name, time.perf_counter() - start)
        raise
    elapsed = time.perf_counter() - start
    summary["seconds"] = elapsed
    for path in summary["outputs"]:
        logger.info("  output: %s", Path(path).resolve())
    logger.info("stage %s done in %.1fs", name, elapsed)


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """A progress bar on a terminal (shown only if the loop lasts over two seconds); elsewhere
    (log files, Prefect's UI) a log line every 15 seconds with the count and rate."""
    if sys.stderr.isatty():
        return iter(tqdm(items, desc=desc, total=total, unit=unit, delay=2.0, dynamic_ncols=True, leave=False))
    return _logged_progress(items, desc, total, unit)


def _logged_progress(items: Iterable[T], desc: str, total: int | None, unit: str, every_s: float = 15.0) -> Iterator[T]:
    start = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every_s:
            last = now
            of = f"/{total}" if total else ""
            log.info("%s: %d%s %s (%.1f %s/s)", desc, done, of, unit, done / (now - start), unit)

