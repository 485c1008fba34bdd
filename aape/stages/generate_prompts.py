"""Stage `generate-prompts`: data/classes.json -> prompts/descriptions.parquet + prompts/summary.json.

Descriptions come from an OpenAI-compatible endpoint, the offline local model, or a CuPL-style
JSON file (prompts.source). LLM answers go through the journal under run.cache_dir, so an
interrupted run resumes where it stopped; the outputs are written atomically at the end.
"""

from __future__ import annotations

import logging
from typing import Any

from aape.atomic import atomic_write_json
from aape.config import IMAGE_TEXT_TASKS, Params
from aape.data.manifests import ClassNames
from aape.layout import Layout
from aape.logs import stage
from aape.prompts.generate import build_descriptions, log_counts
from aape.prompts.table import write_descriptions
from aape.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

STAGE = "generate-prompts"


def run(params: Params, tracker: Tracker | None = None) -> dict[str, Any]:
    tracker = tracker or NullTracker()
    layout = Layout.from_params(params)
    if params.run.task in IMAGE_TEXT_TASKS:  # each image's own captions are its prompts: no LLM
        from aape.retrieval import pipeline as retrieval

        with stage(STAGE) as summary:
            retrieval.write_caption_prompts(params, summary)
        return summary
    with stage(STAGE) as summary:
        classes = ClassNames.read(layout.classes_file)  # every class gets descriptions: the names are all it needs
        log.info("dataset '%s': %d classes from %s; source %s", classes.dataset, len(classes.classnames), layout.classes_file, params.prompts.source)
        result = build_descriptions(params, classes)
        write_descriptions(result.rows, layout.descriptions)
        summary_file = layout.prompts / "summary.json"
        atomic_write_json(summary_file, result.summary)
        summary["outputs"] += [str(layout.descriptions), str(summary_file)]

        figures = result.summary
        log_counts(classes, result.rows)
        requests, tokens, cost = figures["requests"], figures["tokens_this_run"], figures["estimated_cost_usd"]
        log.info(
            "%d descriptions for %d classes (dropped: %s); requests sent %d (%d retries), %d answers from the journal; "
            "tokens this run %d in + %d out, estimated cost this run $%.4f (all answers used: $%.4f)",
            figures["descriptions"], figures["classes"], figures["dropped"], requests["sent"], requests["retries"],
            requests["from_journal"], tokens["prompt"], tokens["completion"], cost["this_run"], cost["all_answers"],
        )  # fmt: skip
        headline = {
            "descriptions": figures["descriptions"],
            "classes": figures["classes"],
            "requests_sent": requests["sent"],
            "answers_from_journal": requests["from_journal"],
            "tokens_this_run": tokens["prompt"] + tokens["completion"],
            "estimated_cost_usd": cost["this_run"],
        }
        tracker.set_tags({"prompts.source": params.prompts.source, "prompts.model": str(figures["model"]), "dataset": classes.dataset})
        tracker.log_metrics({f"prompts/{k}": float(v) for k, v in headline.items()})
        tracker.log_artifact(summary_file, "prompts")
        summary.update(headline)
    return summary
