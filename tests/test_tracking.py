"""The one way a stage is run under a tracker (the CLI and the Prefect tasks both use it)."""

from __future__ import annotations

import pytest

from aape.tracking import RecordingTracker, run_stage_tracked


def _stage(calls: list):
    def run(params, **kwargs):
        calls.append((params, kwargs))
        if "tracker" in kwargs:
            kwargs["tracker"].log_metrics({"done": 1.0})
        return {"outputs": ["x"], "params": params}

    return run


def test_without_a_tracker_the_stage_gets_only_its_params():
    calls: list = []
    assert run_stage_tracked("evaluate", _stage(calls), "P") == {"outputs": ["x"], "params": "P"}
    assert calls == [("P", {})]


def test_with_a_tracker_the_stage_reports_to_a_child_run_named_and_tagged_after_it():
    calls: list = []
    root = RecordingTracker()
    summary = run_stage_tracked("train-aggregator", _stage(calls), "P", root)
    assert summary == {"outputs": ["x"], "params": "P"}
    [child] = root.children
    assert (child.name, child.tags) == ("train-aggregator", {"stage": "train-aggregator"})
    assert calls == [("P", {"tracker": child})]
    assert child.metrics == [("done", 1.0, None)] and root.metrics == []  # the stage logged to its child only


def test_a_failing_stage_fails_inside_its_child_run():
    root = RecordingTracker()

    def broken(params, tracker=None):
        tracker.set_tags({"seen": "yes"})
        raise RuntimeError("stage broke")

    with pytest.raises(RuntimeError, match="stage broke"):
        run_stage_tracked("extract-features", broken, "P", root)
    assert [c.name for c in root.children] == ["extract-features"] and root.children[0].tags["seen"] == "yes"


def test_a_stage_headline_is_logged_on_the_parent_run_as_well():
    root = RecordingTracker()

    def evaluate(params, tracker=None):
        return {"outputs": [], "headline": {"base2new/aape/H_mean": 81.5, "base2new/aape/base_accuracy_mean": 88}}

    run_stage_tracked("evaluate", evaluate, "P", root)
    assert sorted(root.metrics) == [("base2new/aape/H_mean", 81.5, None), ("base2new/aape/base_accuracy_mean", 88.0, None)]
    assert root.children[0].metrics == []  # the stage's own run got what the stage logged, nothing more
