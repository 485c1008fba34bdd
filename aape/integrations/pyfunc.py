"""The trained AAPE model as an MLflow pyfunc model: images and class names in, top-k labels out.

Input: a DataFrame with a string column `image` (a file path, or the image's bytes in base64) and,
optionally, a string column `classes` (comma-separated class names for that row). Class names can
instead come as the `classes` params entry (a list of strings); `top_k` (default 5) likewise.
Output: one row per image: `image` (as given, base64 shortened), `label` and `probability` of the
best class, and `top_labels` / `top_probabilities` (the top k).

The model directory (generator.safetensors + generator.json) and the run's params.yaml travel with
the MLflow model; a backbone loaded from a local checkpoint file travels too, so the logged model
is self-contained except for the `aape` package itself, which must be installed where it is loaded.
Prediction runs through `aape.evaluation.predict.Predictor`, the code behind `aape predict`, so both
give the same answers.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

from aape.config import Params, dump_params, load_params
from aape.evaluation.predict import PredictionError, Predictor, predict_images, validate_class_names

log = logging.getLogger(__name__)

MODEL_DIR_ARTIFACT = "model_dir"
PARAMS_ARTIFACT = "params"
BACKBONE_ARTIFACT = "backbone_weights"
DEFAULT_TOP_K = 5


def signature() -> "mlflow.models.ModelSignature":
    from mlflow.models import ModelSignature

    inputs = Schema([ColSpec("string", "image"), ColSpec("string", "classes", required=False)])
    outputs = Schema([
        ColSpec("string", "image"),
        ColSpec("string", "label"),
        ColSpec("double", "probability"),
        ColSpec(Array("string"), "top_labels"),
        ColSpec(Array("double"), "top_probabilities"),
    ])
    params = ParamSchema([ParamSpec("classes", "string", default=[], shape=(-1,)), ParamSpec("top_k", "long", DEFAULT_TOP_K)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 120 else text[:60] + "…" + text[-20:]


class AAPEPyfuncModel(PythonModel):
    """pyfunc wrapper around `Predictor` (backbone + AAPE generator with the fast head)."""

    def load_context(self, context: Any) -> None:
        params = load_params(Path(context.artifacts[PARAMS_ARTIFACT]))
        weights = context.artifacts.get(BACKBONE_ARTIFACT)
        if weights:
            params.backbone.pretrained = str(weights)
        params.run.device = "auto"
        self.skip_unreadable = params.data.skip_unreadable
        self.predictor = Predictor.load(Path(context.artifacts[MODEL_DIR_ARTIFACT]), params)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = params or {}
        top_k = int(params.get("top_k") or DEFAULT_TOP_K)
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise PredictionError(f"the input needs a column 'image' (path or base64 bytes); it has {list(frame.columns)}")
        shared = list(params.get("classes") or [])
        per_row = frame["classes"] if "classes" in frame.columns else None
        groups: dict[tuple[str, ...], list[int]] = {}
        for i in range(len(frame)):
            row_classes = per_row.iloc[i] if per_row is not None else None
            if isinstance(row_classes, str) and row_classes.strip():
                names = row_classes.split(",")
            elif isinstance(row_classes, (list, tuple)) and len(row_classes):
                names = list(row_classes)
            else:
                names = shared
            if not names:
                raise PredictionError(
                    f"row {i} has no class names: pass params={{'classes': [...]}} or a 'classes' column "
                    f"(comma-separated names)"
                )
            groups.setdefault(tuple(validate_class_names(names, f"class names of row {i}")), []).append(i)
        results: dict[int, dict[str, Any]] = {}
        for names, rows in groups.items():
            named = [(f"row {i}", frame["image"].iloc[i]) for i in rows]
            for i, prediction in zip(rows, predict_images(self.predictor, named, list(names), top_k)):
                results[i] = {
                    "image": _short(frame["image"].iloc[i]),
                    "label": prediction.labels[0],
                    "probability": float(prediction.probabilities[0]),
                    "top_labels": list(prediction.labels),
                    "top_probabilities": [float(p) for p in prediction.probabilities],
                }
        return pd.DataFrame([results[i] for i in range(len(frame))],
                            columns=["image", "label", "probability", "top_labels", "top_probabilities"])


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "torchvision", "open_clip_torch", "safetensors", "pillow", "pandas", "pyyaml", "pydantic", "mlflow"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def log_aape_model(model_dir: str | Path, params: Params, artifact_path: str, registered_model_name: str | None = None):
    """Log a generator/seed{S} directory as a pyfunc model in the active MLflow run (registering it
    under `registered_model_name` when given). Returns MLflow's ModelInfo."""
    model_dir = Path(model_dir)
    if not (model_dir / "generator.json").is_file():
        raise PredictionError(f"{model_dir} holds no trained generator (generator.json); run `aape distill-generator`")
    with tempfile.TemporaryDirectory(prefix="aape-pyfunc-") as tmp:
        params_file = Path(tmp) / "params.yaml"
        dump_params(params, params_file)
        artifacts = {MODEL_DIR_ARTIFACT: str(model_dir), PARAMS_ARTIFACT: str(params_file)}
        weights = Path(params.backbone.pretrained).expanduser()
        if not params.backbone.random_init and weights.is_file():
            copy = Path(tmp) / weights.name
            shutil.copy2(weights, copy)
            artifacts[BACKBONE_ARTIFACT] = str(copy)
        if params.backbone.random_init:
            log.warning("logging an AAPE model trained on a RANDOM-INIT backbone: its predictions are meaningless")
        return mlflow.pyfunc.log_model(
            name=artifact_path,
            python_model=AAPEPyfuncModel(),
            artifacts=artifacts,
            signature=signature(),
            pip_requirements=_requirements(),
            registered_model_name=registered_model_name,
            metadata={"random_init": params.backbone.random_init, "backbone": f"{params.backbone.model}/{params.backbone.pretrained}"},
        )
