"""Dataset sources: CoOp's real split files, CoOp's rebuild rules, ImageNet and its variants, manifests,
downloads. Tests that read ../shared/assets skip when it is absent."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from aape.config import DataConfig
from aape.data import (
    KNOWN_DATASETS,
    DatasetNotFoundError,
    Record,
    SplitFileError,
    UnknownDatasetError,
    build_dataset,
    canonical_name,
    load_dataset,
)
from aape.data.coop import COOP_DATASETS, EUROSAT_RENAMES, load_coop_dataset
from aape.data.imagenet_subsets import IMAGENET_A_WNIDS, IMAGENET_R_WNIDS
from aape.data.registry import FEWSHOT_DATASETS, name_key
from aape.data.splits import split_by_proportion, split_trainval
from conftest import shared_asset

# CoOp's published split sizes (train, val, test) and class counts for the 7 files we have
OFFICIAL = {
    "caltech101": ("Caltech101", 100, (4128, 1649, 2465)),
    "dtd": ("DescribableTextures", 47, (2820, 1128, 1692)),
    "eurosat": ("EuroSAT", 10, (13500, 5400, 8100)),
    "oxford_flowers": ("OxfordFlowers", 102, (4093, 1633, 2463)),
    "oxford_pets": ("OxfordPets", 37, (2944, 736, 3669)),
    "stanford_cars": ("StanfordCars", 196, (6509, 1635, 8041)),
    "ucf101": ("UCF101", 101, (7639, 1898, 3783)),
}


def official_layout(tmp_path: Path, key: str) -> Path:
    """data.root with only the dataset folder and its (linked) official split file."""
    spec = COOP_DATASETS[key]
    source = shared_asset("coop_splits", spec.split_file_name)
    folder = tmp_path / spec.dirname
    folder.mkdir(parents=True)
    (folder / spec.split_file_name).symlink_to(source)
    return tmp_path


def raw_split(key: str) -> dict[str, list]:
    return json.loads(shared_asset("coop_splits", COOP_DATASETS[key].split_file_name).read_text())


def per_class(records) -> Counter:
    return Counter(r.label if isinstance(r, Record) else r[1] for r in records)


# -- the official split files ----------------------------------------------------------------------
@pytest.mark.parametrize("key", sorted(OFFICIAL))
def test_official_split_files_load_with_exact_counts_and_class_names(tmp_path, key):
    name, n_classes, sizes = OFFICIAL[key]
    splits = load_dataset(key, official_layout(tmp_path, key))
    assert splits.official_split and "official" in splits.split_source
    assert (len(splits.train), len(splits.val), len(splits.test)) == sizes
    assert splits.num_classes == n_classes
    # the class names are the file's, label by label, untouched
    raw = raw_split(key)
    by_label = {label: cname for part in raw.values() for _, label, cname in part}
    assert splits.classnames == [by_label[i] for i in range(n_classes)]
    for part in ("train", "val", "test"):
        assert set(splits.split(part)) == {Record(*entry) for entry in raw[part]}
    assert splits.image_root == str(tmp_path / COOP_DATASETS[key].dirname / COOP_DATASETS[key].image_subdir).rstrip("/")


def test_official_class_names_follow_coops_rules(tmp_path):
    names = {key: load_dataset(key, official_layout(tmp_path / key, key)).classnames for key in OFFICIAL}
    assert names["eurosat"] == list(EUROSAT_RENAMES.values())
    assert names["caltech101"][:4] == ["face", "leopard", "motorbike", "accordion"]
    assert "background_google" not in {n.lower() for n in names["caltech101"]}
    assert all(n == n.lower() for n in names["oxford_pets"]) and "american_pit_bull_terrier" in names["oxford_pets"]
    assert all(re.match(r"^(19|20)\d\d ", n) for n in names["stanford_cars"])  # year first
    assert names["ucf101"][0] == "Apply_Eye_Makeup" and "Yo_Yo" in names["ucf101"]
    assert names["dtd"] == sorted(names["dtd"])


def test_torchvision_flower_names_match_coops(tmp_path):
    from torchvision.datasets import Flowers102

    from aape.data.download import flowers_cat_to_name

    coop = load_dataset("oxford_flowers", official_layout(tmp_path, "oxford_flowers")).classnames
    written = flowers_cat_to_name(list(Flowers102.classes))  # the cat_to_name.json a download writes
    assert [written[str(i + 1)] for i in range(102)] == coop


# -- rebuilding a split when the official file is absent ---------------------------------------------
@pytest.mark.parametrize("key", ["caltech101", "dtd", "eurosat", "oxford_flowers"])
def test_rebuild_rule_gives_coops_per_class_sizes(key):
    """CoOp made these splits 50/20/30 per class: our rule reproduces every class's sizes."""
    raw = raw_split(key)
    everything = [Record(p, y, c) for part in raw.values() for p, y, c in part]
    train, val, test = split_by_proportion(everything, key)
    for ours, theirs in ((train, raw["train"]), (val, raw["val"]), (test, raw["test"])):
        assert per_class(ours) == per_class(theirs)


@pytest.mark.parametrize("key", ["caltech101", "eurosat", "dtd"])
def test_folder_rebuild_reproduces_coops_class_names_and_labels(tmp_path, key):
    raw = raw_split(key)
    spec = COOP_DATASETS[key]
    image_dir = tmp_path / spec.dirname / spec.image_subdir
    folders = sorted({p.split("/")[0] for part in raw.values() for p, _, _ in part})
    if key == "caltech101":
        folders += ["BACKGROUND_Google", "Faces_easy"]  # present in the archive, ignored by CoOp
    for folder in folders:
        (image_dir / folder).mkdir(parents=True)
        for i in range(4):
            (image_dir / folder / f"image_{i:04d}.jpg").write_bytes(b"")
    splits = load_coop_dataset(spec, str(tmp_path))
    official = load_dataset(key, official_layout(tmp_path / "official", key))
    assert splits.classnames == official.classnames
    assert not splits.official_split and "NOT the official" in splits.split_source
    assert any("NOT CoOp's official split" in note for note in splits.notes)
    assert per_class(splits.train) == Counter({label: 2 for label in range(official.num_classes)})


def test_pets_rebuild_from_annotations_matches_the_official_split(tmp_path):
    raw = raw_split("oxford_pets")
    annotations = tmp_path / "oxford_pets" / "annotations"
    annotations.mkdir(parents=True)

    def lines(part):
        return "".join(f"{p[:-4]} {y + 1} 1 1\n" for p, y, _ in part)

    (annotations / "trainval.txt").write_text(lines(raw["train"] + raw["val"]))
    (annotations / "test.txt").write_text(lines(raw["test"]))
    splits = load_dataset("oxford_pets", tmp_path)
    assert splits.classnames == load_dataset("oxford_pets", official_layout(tmp_path / "o", "oxford_pets")).classnames
    assert per_class(splits.train) == per_class(raw["train"]) and per_class(splits.val) == per_class(raw["val"])
    assert {r.path for r in splits.test} == {p for p, _, _ in raw["test"]}
    assert not splits.official_split


def test_ucf101_rebuild_from_lists_matches_the_official_split(tmp_path):
    raw = raw_split("ucf101")
    lists = tmp_path / "ucf101" / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    names = {y: c for part in raw.values() for _, y, c in part}
    (lists / "classInd.txt").write_text("".join(f"{y + 1} {names[y].replace('_', '')}\n" for y in sorted(names)))

    def lines(part, with_label):
        return "".join(
            f"{c.replace('_', '')}/{p.split('/')[1][:-4]}.avi" + (f" {y + 1}" if with_label else "") + "\n" for p, y, c in part
        )

    (lists / "trainlist01.txt").write_text(lines(raw["train"] + raw["val"], True))
    (lists / "testlist01.txt").write_text(lines(raw["test"], False))
    splits = load_dataset("ucf101", tmp_path)
    assert splits.classnames == [names[y] for y in sorted(names)]
    assert per_class(splits.val) == per_class(raw["val"])
    assert {r.path for r in splits.test} == {p for p, _, _ in raw["test"]}


def test_rebuild_is_deterministic_and_disjoint():
    records = [Record(f"c{c}/{i}.jpg", c, f"c{c}") for c in range(3) for i in range(23)]
    first = split_trainval(records, "x")
    assert first == split_trainval(list(reversed(records)), "x")
    assert not ({r.path for r in first[0]} & {r.path for r in first[1]})
    assert per_class(first[1]) == Counter({0: 5, 1: 5, 2: 5})  # round(23 * 0.2)


def test_fgvc_aircraft_reads_the_official_variant_lists(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    folder.mkdir()
    variants = ["707-320", "A300B4", "F/A-18", "Cessna 172"]
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    for part, rows in {
        "train": [("0001", "F/A-18"), ("0002", "Cessna 172"), ("0003", "707-320"), ("0004", "A300B4")],
        "val": [("0005", "Cessna 172"), ("0006", "707-320"), ("0007", "A300B4"), ("0008", "F/A-18")],
        "test": [("0009", "A300B4")],
    }.items():
        (folder / f"images_variant_{part}.txt").write_text("".join(f"{i} {v}\n" for i, v in rows))
    splits = load_dataset("fgvc_aircraft", tmp_path)
    assert splits.classnames == variants and splits.official_split
    assert Record("0002.jpg", 3, "Cessna 172") in splits.train
    assert splits.test == [Record("0009.jpg", 1, "A300B4")]
    assert splits.image_root == str(folder / "images")


# -- ImageNet and its variants ----------------------------------------------------------------------
def test_imagenet_subset_lists_are_the_published_200_classes():
    for wnids, digest in (
        (IMAGENET_A_WNIDS, "ff8c384504d3ec59dd70537e83c7ed3dfa0debb07210febc47b58c136a443706"),
        (IMAGENET_R_WNIDS, "354baa0a46566aa68cee6a8093d8de471b7d45a1004b81a95c6210f757ad3740"),
    ):
        assert len(wnids) == len(set(wnids)) == 200 and list(wnids) == sorted(wnids)
        assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
        assert hashlib.sha256(" ".join(wnids).encode()).hexdigest() == digest  # guards against edits


def _classnames_txt(path: Path, wnids) -> dict[str, str]:
    names = {w: f"class {w}" for w in sorted(wnids)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {n}\n" for w, n in names.items()))
    return names


def _touch_classes(folder: Path, classes, per_class: int = 1) -> None:
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            (folder / c / f"{c}_{i}.JPEG").write_bytes(b"")


def test_imagenet_uses_classnames_txt_and_its_val_set_as_test(tmp_path):
    wnids = ["n01440764", "n01443537", "n01484850"]
    names = _classnames_txt(tmp_path / "imagenet" / "classnames.txt", wnids)
    _touch_classes(tmp_path / "imagenet" / "images" / "train", wnids, 3)
    _touch_classes(tmp_path / "imagenet" / "images" / "val", wnids, 2)
    splits = load_dataset("imagenet", tmp_path)
    assert splits.classnames == [names[w] for w in wnids]
    assert len(splits.train) == 9 and len(splits.test) == 6 and splits.val == splits.test
    assert Record("val/n01443537/n01443537_1.JPEG", 1, "class n01443537") in splits.test


def test_imagenet_folders_must_match_classnames_txt(tmp_path):
    _classnames_txt(tmp_path / "imagenet" / "classnames.txt", ["n01440764", "n01443537"])
    _touch_classes(tmp_path / "imagenet" / "images" / "train", ["n01440764", "n09999999"])
    _touch_classes(tmp_path / "imagenet" / "images" / "val", ["n01440764", "n09999999"])
    with pytest.raises(SplitFileError, match=r"1 missing \(n01443537\), 1 unexpected \(n09999999\)"):
        load_dataset("imagenet", tmp_path)


@pytest.mark.parametrize("key, dirname, subdir, wnids", [
    ("imagenet_a", "imagenet-adversarial", "imagenet-a", IMAGENET_A_WNIDS),
    ("imagenet_r", "imagenet-rendition", "imagenet-r", IMAGENET_R_WNIDS),
])
def test_imagenet_a_and_r_use_their_200_classes_mapped_to_imagenet(tmp_path, key, dirname, subdir, wnids):
    every = sorted(set(IMAGENET_A_WNIDS) | set(IMAGENET_R_WNIDS) | {"n00000001", "n99999999"})
    names = _classnames_txt(tmp_path / dirname / "classnames.txt", every)
    _touch_classes(tmp_path / dirname / subdir, wnids)
    (tmp_path / dirname / subdir / "README.txt").write_text("not a class")
    splits = load_dataset(key.replace("_", "-"), tmp_path)
    assert splits.eval_only and not splits.train and len(splits.test) == 200
    assert splits.classnames == [names[w] for w in wnids]
    assert [every[p] for p in splits.parent_labels] == list(wnids)
    assert Record(f"{wnids[7]}/{wnids[7]}_0.JPEG", 7, names[wnids[7]]) in splits.test


def test_imagenet_a_with_a_missing_class_folder_is_refused(tmp_path):
    _classnames_txt(tmp_path / "imagenet-adversarial" / "classnames.txt", IMAGENET_A_WNIDS)
    _touch_classes(tmp_path / "imagenet-adversarial" / "imagenet-a", IMAGENET_A_WNIDS[1:])
    with pytest.raises(SplitFileError, match=f"1 missing \\({IMAGENET_A_WNIDS[0]}\\)"):
        load_dataset("imagenet_a", tmp_path)


def test_imagenetv2_and_sketch(tmp_path):
    wnids = ["n01440764", "n01443537", "n01484850"]
    for dirname in ("imagenetv2", "imagenet-sketch"):
        names = _classnames_txt(tmp_path / dirname / "classnames.txt", wnids)
    _touch_classes(tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val", ["0", "1", "2"], 2)
    _touch_classes(tmp_path / "imagenet-sketch" / "images", wnids, 2)
    v2 = load_dataset("ImageNet-V2", tmp_path)
    sketch = load_dataset("imagenet_sketch", tmp_path)
    assert v2.classnames == sketch.classnames == [names[w] for w in wnids]
    assert Record("2/2_1.JPEG", 2, names[wnids[2]]) in v2.test and v2.parent_labels == [0, 1, 2]
    assert len(sketch.test) == 6 and sketch.eval_only


# -- names ----------------------------------------------------------------------------------------
def test_dataset_names_accept_coop_and_torchvision_spellings():
    assert canonical_name("EuroSAT") == "eurosat"
    assert canonical_name("DescribableTextures") == "dtd"
    assert canonical_name("Flowers102") == "oxford_flowers"
    assert canonical_name("imagenet-a") == "imagenet_a"
    assert canonical_name("demo_mnist") == "demo-mnist"
    # every dataset of the few-shot benchmark is known, under its own key as the canonical name
    assert set(FEWSHOT_DATASETS) <= set(KNOWN_DATASETS)
    assert [canonical_name(key) for key in FEWSHOT_DATASETS] == list(FEWSHOT_DATASETS)
    assert [name_key(n) for n in ("OxfordPets", "My-Birds", "my_birds")] == ["oxford_pets", "mybirds", "mybirds"]


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(UnknownDatasetError) as err:
        build_dataset(DataConfig(dataset="eurosta"))
    message = str(err.value)
    assert "unknown dataset 'eurosta'" in message and "Did you mean 'eurosat'" in message
    for key in ("demo-mnist", "caltech101", "imagenet_r", "folder", "manifest"):
        assert key in message


# -- manifests ------------------------------------------------------------------------------------
def test_manifest_csv_with_a_split_column(tmp_path):
    rows = [(f"img/{s}_{c}_{i}.jpg", c, ["cat", "dog"][c], s) for s in ("train", "test") for c in (0, 1) for i in range(5)]
    pd.DataFrame(rows, columns=["path", "label", "classname", "split"]).to_csv(tmp_path / "m.csv", index=False)
    splits = build_dataset(DataConfig(dataset="manifest", path=str(tmp_path / "m.csv")))
    assert splits.classnames == ["cat", "dog"] and splits.image_root == str(tmp_path)
    assert splits.counts() == {"train": 8, "val": 2, "test": 10}  # val = 20% of train per class
    assert all(r.path.startswith("img/train_") for r in splits.train + splits.val)


def test_manifest_parquet_without_split_is_split_50_20_30(tmp_path):
    rows = [(f"{c}/{i}.png", c, f"class {c}") for c in range(3) for i in range(10)]
    pd.DataFrame(rows, columns=["path", "label", "classname"]).to_parquet(tmp_path / "m.parquet")
    splits = build_dataset(DataConfig(dataset="manifest", path=str(tmp_path / "m.parquet")))
    assert splits.counts() == {"train": 15, "val": 6, "test": 9} and not splits.official_split


@pytest.mark.parametrize("rows, message", [
    ([("/abs/a.jpg", 0, "a"), ("b.jpg", 1, "b")], r"row 2: path '/abs/a.jpg' must be relative"),
    ([("a.jpg", 0, "a"), ("b.jpg", 0, "b")], r"label 0 has two class names, 'a' and 'b'"),
    ([("a.jpg", 0, "a"), ("b.jpg", 2, "b")], r"labels \[1\] are missing"),
    ([("a.jpg", "zero", "a")], r"row 2: label 'zero' is not an integer"),
])
def test_manifest_errors_name_the_row(tmp_path, rows, message):
    pd.DataFrame(rows, columns=["path", "label", "classname"]).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(SplitFileError, match=message):
        build_dataset(DataConfig(dataset="manifest", path=str(tmp_path / "m.csv")))


def test_manifest_without_required_columns(tmp_path):
    pd.DataFrame({"file": ["a.jpg"], "label": [0]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(SplitFileError, match=r"lacks column\(s\) \['path', 'classname'\]"):
        build_dataset(DataConfig(dataset="manifest", path=str(tmp_path / "m.csv")))


# -- downloads ------------------------------------------------------------------------------------
def test_missing_dataset_without_download_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset(DataConfig(dataset="eurosat", root=str(tmp_path)))
    message = str(err.value)
    assert str(tmp_path / "eurosat") in message and "data.download: true" in message and "DATASETS.md" in message


def test_download_fails_fast_and_clearly_when_the_host_is_unreachable(tmp_path, monkeypatch):
    from aape.data import download

    spec = download.DOWNLOADS["eurosat"]
    monkeypatch.setitem(download.DOWNLOADS, "eurosat", download.Download("eurosat", "https://no-such-host.invalid/x", spec.fetch, spec.manual))
    with pytest.raises(download.DatasetDownloadError) as err:
        build_dataset(DataConfig(dataset="eurosat", root=str(tmp_path), download=True))
    message = str(err.value)
    assert "no-such-host.invalid is not reachable (offline?)" in message
    assert str(tmp_path / "eurosat/2750/<class>/*.jpg") in message and "demo-mnist" in message
    assert not (tmp_path / "eurosat").exists()


def test_download_on_this_offline_machine_fails_within_seconds(tmp_path):
    from aape.data.download import DOWNLOADS, DatasetDownloadError, host_reachable

    if host_reachable(DOWNLOADS["dtd"].url):
        pytest.skip("this machine is online: the offline path cannot be observed without downloading")
    with pytest.raises(DatasetDownloadError, match="www.robots.ox.ac.uk is not reachable"):
        build_dataset(DataConfig(dataset="dtd", root=str(tmp_path), download=True))
    assert not (tmp_path / "dtd").exists()  # stopped at the reachability check, before any download began


def test_datasets_torchvision_cannot_fetch_say_so(tmp_path):
    from aape.data.images import DataError

    with pytest.raises(DataError, match="ucf101 cannot be downloaded automatically"):
        build_dataset(DataConfig(dataset="ucf101", root=str(tmp_path), download=True))


def test_a_download_is_placed_in_coops_layout_and_loads(tmp_path, monkeypatch):
    """torchvision's archive layout (faked here: no network) ends up where CoOp's loader reads it."""
    import numpy as np
    import torchvision.datasets
    from PIL import Image
    from scipy.io import savemat

    from aape.data import download

    class FakeFlowers102:
        classes = ["pink primrose", "pink-yellow dahlia?", "sweet pea"]

        def __init__(self, root, download=False):
            base = Path(root) / "flowers-102"
            (base / "jpg").mkdir(parents=True)
            labels = [1 + i % 3 for i in range(30)]
            for i in range(30):
                Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(base / "jpg" / f"image_{i + 1:05d}.jpg")
            savemat(base / "imagelabels.mat", {"labels": np.array([labels])})
            savemat(base / "setid.mat", {"trnid": np.array([[1]])})

    monkeypatch.setattr(torchvision.datasets, "Flowers102", FakeFlowers102)
    monkeypatch.setattr(download, "host_reachable", lambda url, timeout=3.0: True)
    splits = build_dataset(DataConfig(dataset="oxford_flowers", root=str(tmp_path), download=True))
    assert splits.classnames == ["pink primrose", "pink-yellow dahlia", "sweet pea"]
    assert splits.counts() == {"train": 15, "val": 6, "test": 9} and not splits.official_split
    assert splits.image_root == str(tmp_path / "oxford_flowers" / "jpg")
    assert not (tmp_path / ".downloads" / "oxford_flowers").exists()  # staging removed once placed
    assert sorted(p.name for p in (tmp_path / "oxford_flowers").iterdir()) == ["cat_to_name.json", "imagelabels.mat", "jpg", "setid.mat"]


def test_folder_dataset_on_real_cifar10_images():
    from aape.data import draw_fewshot, open_image

    folder = shared_asset("images", "cifar10_test")
    splits = build_dataset(DataConfig(dataset="folder", path=str(folder)))
    assert splits.classnames == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert splits.counts() == {"train": 5000, "val": 2000, "test": 3000}
    drawn = draw_fewshot(splits.train, 2, seed=1)
    assert [open_image(folder / r.path).size for r in drawn] == [(32, 32)] * 20
