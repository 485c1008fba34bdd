"""Log the trained AAPE model as an MLflow pyfunc model, register it, and keep the alias `best`
on the version whose run scored highest on the headline metric."""

from __future__ import annotations

import json
import logging
from typing import Any

from prefect import task

from aape.config import Params
from aape.layout import Layout

log = logging.getLogger("aape.registry")

BEST_ALIAS = "best"


def headline_metric(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """AAPE's harmonic mean H for base-to-new, else its accuracy (both averaged over seeds)."""
    for suffix in ("aape/H_mean", "aape/accuracy_mean"):
        for key, value in metrics.items():
            if key.endswith(suffix) and isinstance(value, (int, float)):
                return key, float(value)
    return None


def _best_seed_dir(params: Params):
    """The seed's generator chosen on validation accuracy (never on test)."""
    layout = Layout.from_params(params)
    best, best_val = None, float("-inf")
    for seed in params.run.seeds:
        folder = layout.seed_dir(layout.generator, seed)
        meta = folder / "generator.json"
        if not meta.exists():
            continue
        val = json.loads(meta.read_text()).get("best_val_accuracy", float("-inf"))
        if best is None or val > best_val:
            best, best_val = folder, val
    if best is None:
        raise FileNotFoundError(f"no trained generator under {layout.generator}; run the distill-generator stage first")
    return best


def register_model(params: Params, tracker: Any) -> dict[str, Any]:
    import mlflow

    from aape.integrations.mlflow_tracking import resolve_tracking_uri
    from aape.integrations.pyfunc import log_aape_model

    uri = resolve_tracking_uri(params.tracking.uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = params.tracking.registered_model
    model_dir = _best_seed_dir(params)
    with mlflow.start_run(run_id=tracker.run_id):
        info = log_aape_model(model_dir, params, artifact_path="aape_model", registered_model_name=name)
    version = str(getattr(info, "registered_model_version", None) or "")
    metrics_file = Layout.from_params(params).metrics
    headline = headline_metric(json.loads(metrics_file.read_text())) if metrics_file.exists() else None
    result = {"registered_model": name, "version": version, "model_dir": str(model_dir), "alias": None}
    if not version:
        return result
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    metric_name = headline[0] if headline else None
    score = headline[1] if headline else float("-inf")
    client.set_model_version_tag(name, version, "headline_metric", metric_name or "none")
    client.set_model_version_tag(name, version, "headline_value", f"{score}")
    client.set_model_version_tag(name, version, "random_init", str(params.backbone.random_init).lower())
    if score >= _current_best_score(client, name):
        client.set_registered_model_alias(name, BEST_ALIAS, version)
        result["alias"] = BEST_ALIAS
        log.info("registered %s version %s with alias '%s' (%s = %.4f)", name, version, BEST_ALIAS, metric_name, score)
    else:
        log.info("registered %s version %s; alias '%s' stays on a better version", name, version, BEST_ALIAS)
    return result


def _current_best_score(client: Any, name: str) -> float:
    try:
        current = client.get_model_version_by_alias(name, BEST_ALIAS)
    except Exception:  # no alias yet
        return float("-inf")
    try:
        return float(current.tags.get("headline_value", "-inf"))
    except ValueError:
        return float("-inf")


register_model_task = task(register_model, name="register-model", task_run_name="register-model")
