"""`aape predict` and the MLflow pyfunc model: any class names, top-k with probabilities, the same
answers from both, and clear errors for bad input."""

from __future__ import annotations

import base64
import csv
import math

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from aape.backbone import load_backbone
from aape.config import BackboneConfig, load_params
from aape.evaluation.predict import (
    PredictionError,
    collect_images,
    decode_image,
    predict_paths,
    read_class_names,
    write_or_print,
)

CLASSES = ["red square", "green field", "blue sky", "grey stone"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_backbone):
    """A tiny backbone saved as a checkpoint file, an AAPE model trained 'on' it, a folder of images."""
    from aape.method.model import AAPEModel

    root = tmp_path_factory.mktemp("predict")
    weights = root / "tiny.pt"
    torch.save(tiny_backbone.model.state_dict(), weights)
    backbone = load_backbone(BackboneConfig(model="aape-tiny", pretrained=str(weights)), device="cpu")
    torch.manual_seed(0)
    model = AAPEModel(dim=64, hidden=8, head="bottleneck", head_hidden=8, logit_scale=backbone.logit_scale)
    model_dir = root / "generator" / "seed1"
    model.save(model_dir, {"backbone_identity": backbone.identity, "classnames": ["a", "b"], "random_init": False})
    images = root / "images"
    colours = [(220, 20, 20), (20, 200, 30), (30, 60, 230), (128, 128, 128), (250, 250, 0)]
    for i, colour in enumerate(colours):
        folder = images / ("sub" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + i, 36), colour).save(folder / f"img{i}.png")
    (images / "notes.txt").write_text("not an image")
    params = load_params(None, [f"backbone.model=aape-tiny", f"backbone.pretrained={weights}", "run.device=cpu",
                                "evaluation.batch_size=2", f"run.output_dir={root / 'artifacts'}", "tracking.enabled=false"])
    return {"root": root, "weights": weights, "backbone": backbone, "model": model, "model_dir": model_dir,
            "images": images, "params": params}


def _reference(world, path, classnames, k):
    """The prediction computed by hand: eval preprocessing, backbone, fast head, softmax."""
    backbone, model = world["backbone"], world["model"]
    feats = backbone.encode_images(backbone.eval_transform(Image.open(path).convert("RGB")).unsqueeze(0))
    text = backbone.encode_texts([f"a photo of a {c}." for c in classnames])
    with torch.inference_mode():
        probs = model.logits(feats, text).softmax(-1)[0]
    values, idx = probs.topk(k)
    return [classnames[i] for i in idx.tolist()], values.tolist()


def test_predict_classifies_folders_recursively_in_sorted_order_with_any_class_names(world):
    predictions = predict_paths([world["images"]], world["model_dir"], CLASSES, world["params"], top_k=3)
    paths = [p.path for p in predictions]
    assert len(predictions) == 5 and paths == sorted(paths) and not any(p.endswith(".txt") for p in paths)
    for p in predictions:
        labels, probs = _reference(world, p.path, CLASSES, 3)
        assert p.labels == labels
        assert p.probabilities == pytest.approx(probs, abs=1e-5)
        assert p.probabilities == sorted(p.probabilities, reverse=True) and sum(p.probabilities) <= 1 + 1e-6


def test_top_k_is_capped_by_the_number_of_classes(world):
    single = sorted(world["images"].glob("*.png"))[0]
    [prediction] = predict_paths([single], world["model_dir"], ["cat", "dog"], world["params"], top_k=5)
    assert sorted(prediction.labels) == ["cat", "dog"] and sum(prediction.probabilities) == pytest.approx(1.0, abs=1e-5)


def test_class_names_from_a_string_or_a_file(tmp_path):
    assert read_class_names(" cat, dog ,bird ") == ["cat", "dog", "bird"]
    listing = tmp_path / "classes.txt"
    listing.write_text("# my classes\nsea lion\n\nharbour seal\n")
    assert read_class_names(str(listing)) == ["sea lion", "harbour seal"]
    with pytest.raises(PredictionError, match="'cat' more than once"):
        read_class_names("cat,dog,cat")
    with pytest.raises(PredictionError, match="at least two"):
        read_class_names("cat")


def test_an_empty_folder_is_named(tmp_path):
    empty = tmp_path / "holiday_photos"
    (empty / "nested").mkdir(parents=True)
    (empty / "nested" / "readme.md").write_text("x")
    with pytest.raises(PredictionError, match="holiday_photos holds no image files"):
        collect_images([empty])


def test_unreadable_image_is_named(world, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        predict_paths([broken], world["model_dir"], CLASSES, world["params"], top_k=1)


def test_a_checkpoint_from_another_backbone_is_refused(world, tmp_path):
    from aape.method.checkpoint import CheckpointMismatchError

    other = tmp_path / "other.pt"
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in world["backbone"].model.state_dict().items()}
    torch.save(state, other)
    params = world["params"].model_copy(deep=True)
    params.backbone.pretrained = str(other)
    with pytest.raises(CheckpointMismatchError, match="trained on embeddings of backbone"):
        predict_paths([world["images"]], world["model_dir"], CLASSES, params, top_k=1)


def test_a_directory_without_a_model_is_named(world, tmp_path):
    with pytest.raises(PredictionError, match="not a trained AAPE model"):
        predict_paths([world["images"]], tmp_path, CLASSES, world["params"], top_k=1)


def test_decode_image_accepts_bytes_and_base64_and_names_bad_input(world):
    png = sorted(world["images"].glob("*.png"))[0]
    raw = png.read_bytes()
    assert decode_image(raw, "row 0").size == Image.open(png).size
    assert decode_image(base64.b64encode(raw).decode(), "row 0").size == Image.open(png).size
    with pytest.raises(PredictionError, match="row 7"):
        decode_image("definitely not base64 !!", "row 7")
    with pytest.raises(PredictionError, match="row 8 holds bytes that are not a readable image"):
        decode_image(base64.b64encode(b"abc").decode(), "row 8")


def test_cli_writes_a_csv_and_prints_a_listing(world, tmp_path, capsys):
    from aape.cli import main

    out = tmp_path / "preds.csv"
    params_file = tmp_path / "params.yaml"
    from aape.config import dump_params

    dump_params(world["params"], params_file)
    args = ["predict", str(world["images"]), "--model", str(world["model_dir"]), "--classes", ",".join(CLASSES),
            "--top-k", "2", "--params", str(params_file)]
    result = CliRunner().invoke(main, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 10 and {r["rank"] for r in rows} == {"1", "2"} and {r["class_name"] for r in rows} <= set(CLASSES)
    printed = CliRunner().invoke(main, args)
    assert printed.exit_code == 0 and "  1. " in printed.output and "img0.png" in printed.output
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = CliRunner().invoke(main, ["predict", str(empty), "--model", str(world["model_dir"]), "--classes", "a,b",
                                       "--params", str(params_file)])
    assert failed.exit_code == 1 and failed.stderr.startswith("error: ") and "holds no image files" in failed.stderr


def test_write_or_print_accepts_dicts(capsys):
    write_or_print([{"path": "x.png", "labels": ["cat", "dog"], "probabilities": [0.75, 0.25]}], None)
    out = capsys.readouterr().out
    assert "x.png" in out and "1. cat  0.7500" in out and "2. dog  0.2500" in out


def test_pyfunc_model_agrees_with_aape_predict(world, tmp_path):
    import mlflow

    from aape.integrations.pyfunc import log_aape_model

    predictions = predict_paths([world["images"]], world["model_dir"], CLASSES, world["params"], top_k=3)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("predict-test", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = log_aape_model(world["model_dir"], world["params"], artifact_path="aape_model", registered_model_name="aape-test")
    assert info.signature is not None and info.signature.params is not None
    assert str(info.registered_model_version) == "1"
    # the backbone's weights travel with the model: loading works after the original file is gone
    world["weights"].rename(world["weights"].with_suffix(".moved"))
    try:
        loaded = mlflow.pyfunc.load_model(info.model_uri)
        paths = [p.path for p in predictions]
        by_path = loaded.predict(pd.DataFrame({"image": paths}), params={"classes": CLASSES, "top_k": 3})
        encoded = [base64.b64encode(open(p, "rb").read()).decode() for p in paths]
        by_bytes = loaded.predict(pd.DataFrame({"image": encoded, "classes": [",".join(CLASSES)] * len(paths)}),
                                  params={"top_k": 3})
    finally:
        world["weights"].with_suffix(".moved").rename(world["weights"])
    for frame in (by_path, by_bytes):
        assert list(frame["label"]) == [p.labels[0] for p in predictions]
        for got_labels, got_probs, expected in zip(frame["top_labels"], frame["top_probabilities"], predictions):
            assert list(got_labels) == expected.labels
            assert list(got_probs) == pytest.approx(expected.probabilities, abs=1e-5)
    with pytest.raises(Exception, match="no class names"):
        loaded.predict(pd.DataFrame({"image": paths[:1]}))
    assert not math.isnan(float(by_path["probability"].iloc[0]))


def test_predict_and_the_datasets_accept_the_same_image_files(tmp_path):
    """One suffix list: what predict's old list and the class-folder loader's old list accepted, in any case."""
    from aape.data.images import IMAGE_SUFFIXES
    from aape.data.splits import list_images

    old_lists = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
    assert set(IMAGE_SUFFIXES) == old_lists
    images = [f"a{suffix}" for suffix in sorted(old_lists)] + [f"b{suffix.upper()}" for suffix in sorted(old_lists)]
    for name in [*images, "notes.txt", "labels.csv", "._a.jpg"]:  # ._a.jpg: macOS metadata, not an image
        (tmp_path / name).write_bytes(b"")
    assert list_images(tmp_path) == sorted(images)
    assert collect_images([tmp_path]) == sorted(tmp_path / name for name in images)
