"""Stage `extract-features`: encode every image and text of the run once, through the feature cache.

Reads data/classes.json, the split and few-shot manifests and prompts/descriptions.parquet; writes
features/ (see aape.features.bundle). A rerun with nothing changed encodes nothing.
"""

from __future__ import annotations

import logging

from aape.backbone import RANDOM_INIT_NOTICE
from aape.config import IMAGE_TEXT_TASKS, Params
from aape.features.extract import Extractor, build_backbone
from aape.layout import Layout
from aape.logs import stage
from aape.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)


def run(params: Params, tracker: Tracker | None = None) -> dict:
    tracker = tracker or NullTracker()
    layout = Layout.from_params(params)
    if params.run.task in IMAGE_TEXT_TASKS:
        from aape.retrieval import pipeline as retrieval

        with stage("extract-features") as summary:
            backbone = retrieval.extract_features(params, summary)
            if params.run.task != "retrieval" and params.prefix.image_features == "grid":
                retrieval.extract_grids(params, summary, backbone)
            else:  # features/ holds exactly what this run's settings make
                from aape.features.grid import remove_pointers

                remove_pointers(layout)
        return summary
    with stage("extract-features") as summary:
        backbone = build_backbone(params)
        if backbone.random_init:
            log.warning(RANDOM_INIT_NOTICE)
        tracker.set_tags({"random_init": str(backbone.random_init).lower(), "backbone": backbone.identity})
        report = Extractor(backbone, layout, params).run()
        summary["outputs"].extend(str(p) for p in report.outputs)
        figures = {
            "images_encoded": report.images_encoded,
            "image_views_reused": report.image_views_reused,
            "texts_encoded": report.texts_encoded,
            "skipped_images": len(report.skipped),
        }
        if report.images_per_s is not None:
            figures["images_per_s"] = round(report.images_per_s, 2)
        summary.update(figures, random_init=backbone.random_init, identity=backbone.identity)
        tracker.log_metrics({f"features/{k}": float(v) for k, v in figures.items()})
        log.info(
            "features: %d image-views encoded, %d reused from the cache, %d texts encoded, %d images skipped%s",
            report.images_encoded,
            report.image_views_reused,
            report.texts_encoded,
            len(report.skipped),
            " [RANDOM-INIT backbone]" if backbone.random_init else "",
        )
    return summary
