"""The tracking interface stages report to. The library never imports a tracking backend:
callers hand in a `Tracker` (MLflow's lives in `aape.integrations.mlflow_tracking`)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def child(self, name: str, tags: dict[str, str] | None = None) -> Any:
        """A context manager yielding a nested Tracker (an MLflow nested run)."""
        ...

    def peer(self, name: str, tags: dict[str, str] | None = None) -> Any:
        """Like `child`, but beside this run: under this run's parent (this run's child when it has none).
        A stage's per-method summaries go there, one level under the pipeline's run instead of two, so
        the runs table lists them beside the stages."""
        ...


class NullTracker:
    """Accepts everything, records nothing: the default when no tracking is wanted."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    @contextmanager
    def child(self, name: str, tags: dict[str, str] | None = None) -> Iterator["NullTracker"]:
        yield self

    def peer(self, name: str, tags: dict[str, str] | None = None) -> Any:
        return self.child(name, tags)


class RecordingTracker(NullTracker):
    """Keeps what it is told in memory: for tests and for summaries."""

    def __init__(self, name: str = "root", parent: "RecordingTracker | None" = None) -> None:
        self.name = name
        self.parent = parent
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[str, float, int | None]] = []
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[str, str | None]] = []
        self.children: list[RecordingTracker] = []

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.extend((k, float(v), step) for k, v in metrics.items())

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    @contextmanager
    def child(self, name: str, tags: dict[str, str] | None = None) -> Iterator["RecordingTracker"]:
        sub = RecordingTracker(name, self)
        sub.tags.update(tags or {})
        self.children.append(sub)
        yield sub

    def peer(self, name: str, tags: dict[str, str] | None = None) -> Any:
        return (self.parent or self).child(name, tags)


def run_stage_tracked(name: str, fn: Callable[..., dict[str, Any]], params: Any, tracker: Tracker | None = None) -> dict[str, Any]:
    """Run stage function `fn` (stage `name`) on `params`; with a tracker, inside a child run of it
    named after the stage and tagged stage=<name>, which the stage reports to. The CLI and the
    Prefect tasks run every stage through this. A stage's `headline` figures (evaluate's AAPE
    accuracies) are logged on the tracker's own run too, so a pipeline's parent run shows them in
    the runs table."""
    if tracker is None:
        return fn(params)
    with tracker.child(name, tags={"stage": name}) as child:
        summary = fn(params, tracker=child)
    headline = summary.get("headline") if isinstance(summary, dict) else None
    if headline:
        tracker.log_metrics({k: float(v) for k, v in headline.items() if isinstance(v, (int, float))})
    return summary
