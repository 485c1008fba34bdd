"""Bad input gets an error that names the culprit and says what to do; skip_unreadable writes a report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from aape.config import BackboneConfig, DataConfig, load_params
from aape.data import (
    ClassCountError,
    DataError,
    MissingImagesError,
    SplitFileError,
    UnreadableImageError,
    build_dataset,
    check_class_count,
    check_classnames,
)
from aape.layout import Layout
from aape.stages.prepare_data import run


def write_png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def eurosat_layout(root: Path, per_class: int = 10) -> Path:
    """A tiny EuroSAT-shaped dataset with its own split_zhou file (3 classes)."""
    folder = root / "eurosat"
    split = {"train": [], "val": [], "test": []}
    for label, (cls, name) in enumerate([("Forest", "Forest"), ("River", "River"), ("SeaLake", "Sea or Lake")]):
        for i in range(per_class):
            rel = f"{cls}/{cls}_{i}.jpg"
            write_png(folder / "2750" / rel, label * 100 + i)
            part = "train" if i < per_class // 2 else "val" if i < per_class * 7 // 10 else "test"
            split[part].append([rel, label, name])
    (folder / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    return root


def params_for(tmp_path: Path, root: Path, *overrides: str):
    return load_params(
        None,
        [
            f"run.output_dir={tmp_path / 'artifacts'}",
            "tracking.enabled=false",
            "data.dataset=eurosat",
            f"data.root={root}",
            "data.shots=2",
            "run.seeds=[1]",
            *overrides,
        ],
    )


# -- missing files ------------------------------------------------------------------------------------
def test_split_that_does_not_match_the_folder_lists_missing_files(tmp_path):
    root = eurosat_layout(tmp_path / "data")
    for i in range(7):
        (root / "eurosat" / "2750" / "River" / f"River_{i}.jpg").unlink()
    with pytest.raises(MissingImagesError) as err:
        run(params_for(tmp_path, root))
    message = str(err.value)
    assert "7 image(s) listed by" in message and "split_zhou_EuroSAT.json" in message
    assert "train: River/River_0.jpg" in message and "... and 2 more" in message
    assert "data.skip_unreadable: true" in message and "data.root" in message
    assert not (tmp_path / "artifacts" / "data" / "classes.json").exists()  # nothing half-written


def test_skip_unreadable_drops_missing_files_and_reports_them(tmp_path):
    root = eurosat_layout(tmp_path / "data")
    (root / "eurosat" / "2750" / "River" / "River_0.jpg").unlink()
    params = params_for(tmp_path, root, "data.skip_unreadable=true")
    summary = run(params)
    layout = Layout.from_params(params)
    report = json.loads((layout.data / "skipped.json").read_text())
    assert report == [{"split": "train", "path": "River/River_0.jpg", "reason": "file does not exist"}]
    assert "River/River_0.jpg" not in set(pd.read_parquet(layout.split_manifest("train")).path)
    assert summary["skipped"] == 1 and summary["counts"]["train"] == 14
    assert json.loads(layout.classes_file.read_text())["skipped_images"] == 1


# -- unreadable files ---------------------------------------------------------------------------------
def test_unreadable_image_stops_the_stage_naming_the_file(tmp_path):
    root = eurosat_layout(tmp_path / "data")
    bad = root / "eurosat" / "2750" / "Forest" / "Forest_9.jpg"  # a test image: always used
    bad.write_bytes(b"this is not an image")
    with pytest.raises(UnreadableImageError) as err:
        run(params_for(tmp_path, root))
    assert str(bad) in str(err.value) and "data.skip_unreadable: true" in str(err.value)


def test_skip_unreadable_redraws_without_the_bad_image(tmp_path):
    root = eurosat_layout(tmp_path / "data")
    params = params_for(tmp_path, root, "data.skip_unreadable=true", "data.protocol=fewshot")
    run(params)
    layout = Layout.from_params(params)
    first_draw = pd.read_parquet(layout.fewshot_manifest(1, "train"))
    victim = first_draw.path.iloc[0]
    (root / "eurosat" / "2750" / victim).write_bytes(b"")  # an empty file where a drawn image was
    run(params)
    redraw = pd.read_parquet(layout.fewshot_manifest(1, "train"))
    assert victim not in set(redraw.path)
    assert redraw.label.value_counts().to_dict() == {0: 2, 1: 2, 2: 2}  # still K per class
    # only the class that lost an image changed
    changed = set(first_draw.path) ^ set(redraw.path)
    assert {p.split("/")[0] for p in changed} == {victim.split("/")[0]}
    report = json.loads((layout.data / "skipped.json").read_text())
    assert report == [{"split": "train", "path": victim, "reason": "file is empty (0 bytes)"}]


# -- class counts -------------------------------------------------------------------------------------
def test_class_count_mismatch_names_what_expected_what():
    check_class_count(10, 10, "descriptions.parquet")
    with pytest.raises(ClassCountError) as err:
        check_class_count(37, 10, "checkpoint generator/seed1/generator.json")
    assert "checkpoint generator/seed1/generator.json expects 37 classes but the dataset has 10" in str(err.value)
    assert "aape prepare-data" in str(err.value)


def test_class_name_mismatch_names_the_first_differing_classes():
    with pytest.raises(ClassCountError) as err:
        check_classnames(["cat", "dog", "owl"], ["cat", "wolf", "owl"], "descriptor file cupl.json")
    assert "label 1: 'dog' vs 'wolf'" in str(err.value) and "descriptor file cupl.json" in str(err.value)
    with pytest.raises(ClassCountError, match="expects 2 classes but the dataset has 3"):
        check_classnames(["cat", "dog"], ["cat", "dog", "owl"], "descriptor file")


# -- malformed inputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    ("{not json", r"is not valid JSON"),
    ('{"train": [], "val": []}', r"must hold the keys train, val and test"),
    ('{"train": [["a.jpg", 0]], "val": [], "test": []}', r"train\[0\] is \['a.jpg', 0\]; each entry must be"),
    ('{"train": [["a.jpg", 0, "x"], ["b.jpg", 0, "y"]], "val": [], "test": []}', r"label 0 has two class names"),
])
def test_malformed_split_file_is_named(tmp_path, content, message):
    (tmp_path / "dtd").mkdir()
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(content)
    with pytest.raises(SplitFileError, match=message) as err:
        build_dataset(DataConfig(dataset="dtd", root=str(tmp_path)))
    assert "split_zhou_DescribableTextures.json" in str(err.value)


def test_folder_dataset_needs_a_path_and_enough_images_per_class(tmp_path):
    with pytest.raises(DataError, match="data.path is not set"):
        build_dataset(DataConfig(dataset="folder"))
    write_png(tmp_path / "imgs" / "big" / "0.png", 0)
    for i in range(6):
        write_png(tmp_path / "imgs" / "big" / f"{i}.png", i)
    for i in range(2):
        write_png(tmp_path / "imgs" / "tiny" / f"{i}.png", i)
    with pytest.raises(DataError, match=r"class 'tiny' \(label 1\) .* has 2 image\(s\): too few"):
        build_dataset(DataConfig(dataset="folder", path=str(tmp_path / "imgs")))


def test_prepare_data_refuses_a_test_only_dataset(tmp_path):
    root = tmp_path / "data"
    (root / "imagenet-sketch" / "images" / "n01440764").mkdir(parents=True)
    write_png(root / "imagenet-sketch" / "images" / "n01440764" / "a.png", 0)
    (root / "imagenet-sketch" / "images" / "n01443537").mkdir(parents=True)
    write_png(root / "imagenet-sketch" / "images" / "n01443537" / "b.png", 1)
    (root / "imagenet-sketch" / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    with pytest.raises(DataError, match="imagenet_sketch is a test-only dataset.*evaluation.domain_shift"):
        run(params_for(tmp_path, root, "data.dataset=imagenet-sketch"))


def test_data_image_size_sets_both_transforms():
    from aape.backbone import load_backbone

    params = load_params(None, ["data.image_size=48"])
    backbone = load_backbone(BackboneConfig(model="aape-tiny", pretrained="random-init"), "cpu", image_size=params.data.image_size)
    image = Image.new("RGB", (100, 70))
    assert backbone.eval_transform(image).shape == (3, 48, 48)
    assert backbone.train_transform(image).shape == (3, 48, 48)


CLASSES = {"dataset": "eurosat", "image_root": "data/eurosat/2750", "classnames": ["Forest", "River", "Sea"],
           "protocol": "base2new", "train_classes": [0, 1], "eval_sets": {"base": [0, 1], "new": [2]},
           "split_hash": "abc", "seeds": [1, 2], "shots": 4}  # fmt: skip


def test_classes_manifest_reads_the_contract_into_one_typed_object(tmp_path):
    """Every stage reads data/classes.json through ClassesManifest.read."""
    from aape.data import ClassesManifest

    path = tmp_path / "classes.json"
    path.write_text(json.dumps({**CLASSES, "val_shots": 4, "test_per_class": None, "num_classes": 3, "notes": ["n"],
                                "official_split": True, "split_source": "CoOp's split", "skipped_images": 2, "later": 1}))
    manifest = ClassesManifest.read(path)
    assert manifest.path == path and manifest.dataset == "eurosat" and manifest.shots == 4 and manifest.seeds == [1, 2]
    assert manifest.train_classes == [0, 1] and manifest.eval_sets == {"base": [0, 1], "new": [2]}
    assert manifest.train_classnames == ["Forest", "River"] and manifest.num_classes == 3
    assert (manifest.val_shots, manifest.test_per_class, manifest.skipped_images, manifest.official_split) == (4, None, 2, True)
    with pytest.raises(AttributeError):  # frozen
        manifest.shots = 16  # type: ignore[misc]
    # the writer and the reader agree: what prepare-data writes reads back equal
    again = ClassesManifest.read(manifest.write(tmp_path / "copy.json"))
    assert again == manifest and json.loads((tmp_path / "copy.json").read_text())["num_classes"] == 3
    path.write_text(json.dumps(CLASSES))  # the additions are optional
    assert ClassesManifest.read(path).notes == [] and ClassesManifest.read(path).val_shots is None


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"classes.json does not exist; run `aape prepare-data` first"),
        ("{not json", r"classes.json is not valid JSON .*rerun `aape prepare-data`"),
        ("[1, 2]", r"classes.json must hold a JSON object; rerun `aape prepare-data`"),
        ({k: v for k, v in CLASSES.items() if k not in ("shots", "train_classes")}, r"classes.json lacks the key\(s\) train_classes, shots; rerun `aape prepare-data`"),
        ({**CLASSES, "shots": "4"}, r"classes.json: key 'shots' must be an integer >= 1 \(found '4'\); rerun `aape prepare-data`"),
        ({**CLASSES, "shots": True}, r"key 'shots' must be an integer >= 1"),
        ({**CLASSES, "classnames": ["Forest", ""]}, r"key 'classnames' must be a non-empty list of non-empty strings"),
        ({**CLASSES, "protocol": "zero-shot"}, r"key 'protocol' must be one of base2new, fewshot"),
        ({**CLASSES, "eval_sets": {"base": "0, 1"}}, r"key 'eval_sets' must map each eval set's name to a list of integer labels"),
        ({**CLASSES, "eval_sets": {"base": [0, 1], "new": [3]}}, r"key 'eval_sets.new' holds labels \[3\] outside the 3 classes"),
        ({**CLASSES, "train_classes": [-1]}, r"key 'train_classes' holds labels \[-1\] outside the 3 classes"),
        ({**CLASSES, "train_classes": []}, r"key 'train_classes' is empty"),
    ],
)
def test_classes_manifest_errors_name_the_file_and_say_to_rerun_prepare_data(tmp_path, content, message):
    from aape.data import ClassesManifest, ClassesManifestError
    from aape.errors import AAPEError

    path = tmp_path / "data" / "classes.json"
    if content is not None:
        path.parent.mkdir()
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ClassesManifestError, match=message) as err:
        ClassesManifest.read(path)
    assert isinstance(err.value, AAPEError) and isinstance(err.value, DataError) and str(path) in str(err.value)


def test_class_names_need_only_the_dataset_and_the_names(tmp_path):
    """generate-prompts reads just these (hand-made files with only them are accepted there)."""
    from aape.data import ClassesManifest, ClassesManifestError, ClassNames

    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"dataset": "eurosat", "classnames": ["Forest", "River"]}))
    assert ClassNames.read(path) == ClassNames("eurosat", ["Forest", "River"])
    with pytest.raises(ClassesManifestError, match=r"lacks the key\(s\) image_root, protocol"):
        ClassesManifest.read(path)
