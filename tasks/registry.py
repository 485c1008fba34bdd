"""Log the trained AAPE model as an MLflow pyfunc model, register it, and keep the alias `best`
on the version whose run scored highest on the headline metric.

Scores are comparable only within one setting (dataset, shots, protocol, backbone and weights), so
every setting has its own alias, `best-<setting>`, moved only by a better version of that setting;
`best` points at the latest version that became its setting's best (a new best of another setting
takes it over, since the two scores cannot be compared). Every version is tagged with its setting.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from prefect import task

from aape.config import Params
from aape.data.manifests import ClassesManifest
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


def model_setting(params: Params) -> dict[str, str]:
    """What a headline score is comparable within; dataset, shots and protocol as prepare-data recorded them."""
    classes = Layout.from_params(params).classes_file
    if classes.exists():
        info = ClassesManifest.read(classes)
        dataset, shots, protocol = info.dataset, info.shots, info.protocol
    else:
        dataset, shots, protocol = params.data.dataset, params.data.shots, params.data.protocol
    return {"dataset": dataset, "shots": str(shots), "protocol": protocol, "backbone": params.backbone.model, "weights": params.backbone.pretrained}


def setting_alias(setting: dict[str, str]) -> str:
    """`best-<dataset>-<shots>shot-<protocol>-<backbone>-<weights>` in the characters MLflow allows in an alias."""
    weights = setting["weights"].rsplit("/", 1)[-1]  # a checkpoint path: its file name
    raw = f"{BEST_ALIAS}-{setting['dataset']}-{setting['shots']}shot-{setting['protocol']}-{setting['backbone']}-{weights}"
    return re.sub(r"[^A-Za-z0-9_-]+", "_", raw).lower()


def register_model(params: Params, tracker: Any) -> dict[str, Any]:
    if params.run.task != "classification":
        # the registered pyfunc model classifies images by class names; a retrieval query has no such interface yet
        log.warning("run.task %s: no model is registered (the registry holds classification models only)", params.run.task)
        return {"registered_model": None, "reason": f"run.task {params.run.task}: only classification models are registered"}
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
    setting = model_setting(params)
    for key, value in setting.items():
        client.set_model_version_tag(name, version, f"setting.{key}", value)
    group_alias = setting_alias(setting)
    result["setting_alias"] = group_alias
    if score < _score_of(_holder(client, name, group_alias)):
        log.info("registered %s version %s; aliases '%s' and '%s' stay on a better version of this setting", name, version, BEST_ALIAS, group_alias)
        return result
    client.set_registered_model_alias(name, group_alias, version)
    holder = _holder(client, name, BEST_ALIAS)
    if holder is not None and _setting_of(holder) != setting:
        log.info("alias '%s' moves from version %s (another setting) to version %s", BEST_ALIAS, holder.version, version)
    client.set_registered_model_alias(name, BEST_ALIAS, version)
    result["alias"] = BEST_ALIAS
    log.info("registered %s version %s with aliases '%s' and '%s' (%s = %.4f)", name, version, BEST_ALIAS, group_alias, metric_name, score)
    return result


def _holder(client: Any, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception:  # no such alias yet
        return None


def _score_of(version: Any | None) -> float:
    if version is None:
        return float("-inf")
    try:
        return float(version.tags.get("headline_value", "-inf"))
    except ValueError:
        return float("-inf")


def _setting_of(version: Any) -> dict[str, str]:
    return {k.removeprefix("setting."): v for k, v in version.tags.items() if k.startswith("setting.")}


register_model_task = task(register_model, name="register-model", task_run_name="register-model")
