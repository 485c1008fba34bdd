"""Caption readers: Karpathy's split files, COCO's caption files and the easy-VQA demo, into
CaptionedImage records, with errors that name the file and what is wrong."""

import json
import logging
import re

import pytest

from aape.data.captions import (
    GENERATED_CAPTIONS_NOTICE,
    CaptionedImage,
    CaptionFileError,
    easy_vqa_captions,
    easy_vqa_image_root,
    flatten_captions,
    read_coco_captions,
    read_karpathy,
)
from aape.data.images import DataError
from aape.errors import AAPEError


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def sentences(*texts):
    return [{"raw": t, "tokens": t.lower().strip(" .").split(), "imgid": 0, "sentid": i} for i, t in enumerate(texts)]


KARPATHY_COCO = {
    "dataset": "coco",
    "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test", "imgid": 0,
         "cocoid": 391895, "sentids": [0, 1],
         "sentences": sentences(" A man riding a motorcycle. ", "A person on a dirt bike.")},
        {"filepath": "val2014", "filename": "COCO_val2014_000000522418.jpg", "split": "restval", "imgid": 1,
         "cocoid": 522418, "sentids": [2], "sentences": sentences("A woman cutting a cake.")},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "split": "train", "imgid": 2,
         "cocoid": 9, "sentids": [3, 4, 5, 6, 7, 8],
         "sentences": sentences("one.", "two.", "three.", "four.", "five.", "six.")},
    ],
}

KARPATHY_FLICKR = {
    "dataset": "flickr30k",
    "images": [
        {"filename": "1000092795.jpg", "split": "train", "imgid": 0, "sentids": [0],
         "sentences": sentences("Two young guys with shaggy hair look at their hands.")},
        {"filename": "1007129816.jpg", "split": "test", "imgid": 1, "sentids": [1, 2],
         "sentences": sentences("A man with an orange hat.", "A man wears an orange hat and glasses.")},
    ],
}


def test_karpathy_coco_paths_join_filepath_and_keep_restval(tmp_path):
    records = read_karpathy(write_json(tmp_path / "coco" / "dataset_coco.json", KARPATHY_COCO))
    assert records[0] == CaptionedImage(
        "val2014/COCO_val2014_000000391895.jpg", ("A man riding a motorcycle.", "A person on a dirt bike."),
        "test", "391895",
    )
    assert [r.split for r in records] == ["test", "restval", "train"]  # restval keeps its name
    assert [r.image_id for r in records] == ["391895", "522418", "9"]
    assert records[2].image == "train2014/COCO_train2014_000000000009.jpg"
    assert len(records[2].captions) == 6 and not any(r.generated for r in records)


def test_karpathy_max_captions_keeps_the_first_ones(tmp_path):
    records = read_karpathy(write_json(tmp_path / "dataset_coco.json", KARPATHY_COCO), max_captions=5)
    assert records[2].captions == ("one.", "two.", "three.", "four.", "five.")
    assert len(records[0].captions) == 2


def test_karpathy_flickr_images_live_in_the_layouts_image_folder(tmp_path):
    path = write_json(tmp_path / "flickr30k" / "dataset_flickr30k.json", KARPATHY_FLICKR)
    records = read_karpathy(path)
    assert [r.image for r in records] == ["flickr30k-images/1000092795.jpg", "flickr30k-images/1007129816.jpg"]
    assert [r.image_id for r in records] == ["1000092795", "1007129816"]
    assert records[1].captions == ("A man with an orange hat.", "A man wears an orange hat and glasses.")
    assert [r.split for r in records] == ["train", "test"]
    assert read_karpathy(path, image_root_hint="")[0].image == "1000092795.jpg"
    assert read_karpathy(path, image_root_hint="images/flickr")[0].image == "images/flickr/1000092795.jpg"


@pytest.mark.parametrize("hint", ["/abs/images", "../images"])
def test_karpathy_image_root_hint_must_stay_inside_the_dataset(tmp_path, hint):
    path = write_json(tmp_path / "dataset_flickr30k.json", KARPATHY_FLICKR)
    with pytest.raises(CaptionFileError, match="relative folder"):
        read_karpathy(path, image_root_hint=hint)


def test_flatten_captions_gives_the_retrieval_columns(tmp_path):
    records = read_karpathy(write_json(tmp_path / "dataset_flickr30k.json", KARPATHY_FLICKR))
    captions, owners = flatten_captions(records)
    assert owners == [0, 1, 1]
    assert captions[1] == "A man with an orange hat."


COCO_CAPTIONS = {
    "info": {}, "licenses": [],
    "images": [{"id": 391895, "file_name": "COCO_val2014_000000391895.jpg", "height": 360, "width": 640},
               {"id": 522418, "file_name": "COCO_val2014_000000522418.jpg", "height": 480, "width": 640}],
    "annotations": [{"image_id": 522418, "id": 1, "caption": "A woman cutting a cake. "},
                    {"image_id": 391895, "id": 2, "caption": "A man riding a motorcycle."},
                    {"image_id": 522418, "id": 3, "caption": "Someone slices a large cake."}],
}


def test_coco_captions_group_annotations_by_image_in_order(tmp_path):
    records = read_coco_captions(write_json(tmp_path / "annotations" / "captions_val2014.json", COCO_CAPTIONS))
    assert records == [
        CaptionedImage("val2014/COCO_val2014_000000391895.jpg", ("A man riding a motorcycle.",), "val", "391895"),
        CaptionedImage("val2014/COCO_val2014_000000522418.jpg",
                       ("A woman cutting a cake.", "Someone slices a large cake."), "val", "522418"),
    ]


def test_coco_captions_split_comes_from_the_file_name(tmp_path):
    records = read_coco_captions(write_json(tmp_path / "captions_train2014.json", COCO_CAPTIONS))
    assert {r.split for r in records} == {"train"} and records[0].image.startswith("train2014/")
    with pytest.raises(CaptionFileError, match=r"captions\.json from its name.*captions_train2014\.json"):
        read_coco_captions(write_json(tmp_path / "captions.json", COCO_CAPTIONS))


def test_a_missing_file_is_named(tmp_path):
    missing = tmp_path / "coco" / "dataset_coco.json"
    with pytest.raises(CaptionFileError, match=re.escape(f"caption file {missing} does not exist")) as info:
        read_karpathy(missing)
    assert isinstance(info.value, DataError) and isinstance(info.value, AAPEError)


def test_invalid_json_is_named(tmp_path):
    path = tmp_path / "captions_val2014.json"
    path.write_text('{"images": [', encoding="utf-8")
    with pytest.raises(CaptionFileError, match=re.escape(f"caption file {path} is not valid JSON")):
        read_coco_captions(path)


@pytest.mark.parametrize(
    "data, match",
    [
        ([1, 2], "holds a JSON list, not an object"),
        ({"annotations": []}, r"has no 'images' list \(top-level keys: annotations\)"),
        ({"images": {"a": 1}}, "has no 'images' list"),
    ],
)
def test_a_wrong_top_level_structure_is_named(tmp_path, data, match):
    path = write_json(tmp_path / "dataset_coco.json", data)
    with pytest.raises(CaptionFileError, match=re.escape(str(path)) + ".*" + match):
        read_karpathy(path)


def test_coco_file_without_annotations_is_named(tmp_path):
    path = write_json(tmp_path / "captions_val2014.json", {"images": COCO_CAPTIONS["images"]})
    with pytest.raises(CaptionFileError, match=r"no 'annotations' list"):
        read_coco_captions(path)


def test_an_uncaptioned_image_is_an_error_unless_allowed(tmp_path, caplog):
    data = json.loads(json.dumps(KARPATHY_FLICKR))
    data["images"][0]["sentences"] = []
    path = write_json(tmp_path / "dataset_flickr30k.json", data)
    with pytest.raises(CaptionFileError, match=re.escape(str(path)) + r": 1 image\(s\) have no caption: "
                       r"flickr30k-images/1000092795\.jpg.*allow_uncaptioned=True"):
        read_karpathy(path)
    with caplog.at_level(logging.WARNING, logger="aape.data.captions"):
        records = read_karpathy(path, allow_uncaptioned=True)
    assert [r.image_id for r in records] == ["1007129816"]
    assert "dropped 1 image(s) without captions" in caplog.text


def test_an_uncaptioned_coco_image_is_an_error_unless_allowed(tmp_path):
    data = dict(COCO_CAPTIONS, annotations=COCO_CAPTIONS["annotations"][:1])  # only image 522418 captioned
    path = write_json(tmp_path / "captions_val2014.json", data)
    with pytest.raises(CaptionFileError, match=r"1 image\(s\) have no caption: val2014/COCO_val2014_000000391895"):
        read_coco_captions(path)
    assert [r.image_id for r in read_coco_captions(path, allow_uncaptioned=True)] == ["522418"]


@pytest.mark.parametrize("sentence", [{"raw": "   ", "tokens": []}, {"tokens": ["a", "dog"]}, "a dog"])
def test_a_sentence_without_text_is_named(tmp_path, sentence):
    data = json.loads(json.dumps(KARPATHY_FLICKR))
    data["images"][1]["sentences"].append(sentence)
    path = write_json(tmp_path / "dataset_flickr30k.json", data)
    with pytest.raises(CaptionFileError, match=re.escape(f"{path}: images[1] (1007129816.jpg): sentences[2] has no text")):
        read_karpathy(path)


def test_a_coco_caption_without_text_is_named(tmp_path):
    data = dict(COCO_CAPTIONS, annotations=[*COCO_CAPTIONS["annotations"], {"image_id": 391895, "caption": ""}])
    path = write_json(tmp_path / "captions_val2014.json", data)
    with pytest.raises(CaptionFileError, match=re.escape(f"{path}: annotations[3] (image_id 391895) has no text")):
        read_coco_captions(path)


def test_a_coco_caption_of_an_unlisted_image_is_named(tmp_path):
    data = dict(COCO_CAPTIONS, annotations=[{"image_id": 7, "caption": "a cat."}])
    path = write_json(tmp_path / "captions_val2014.json", data)
    with pytest.raises(CaptionFileError, match="annotations\\[0\\] names image_id 7, which 'images' does not list"):
        read_coco_captions(path)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"split": "holdout"}, r"images\[0\] \(1000092795\.jpg\) has split 'holdout'; Karpathy's splits are"),
        ({"filename": ""}, r"images\[0\] has no 'filename'"),
        ({"sentences": None}, r"has no 'sentences' list"),
        ({"filename": "1007129816.jpg"}, r"images\[1\] repeats image 'flickr30k-images/1007129816\.jpg'"),
    ],
)
def test_malformed_karpathy_entries_are_named(tmp_path, change, match):
    data = json.loads(json.dumps(KARPATHY_FLICKR))
    data["images"][0].update(change)
    with pytest.raises(CaptionFileError, match=match):
        read_karpathy(write_json(tmp_path / "dataset_flickr30k.json", data))


# --- easy-VQA -----------------------------------------------------------------------------------

COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


@pytest.fixture(scope="module")
def easy_vqa():
    return pytest.importorskip("easy_vqa")


@pytest.fixture(scope="module")
def easy_records(easy_vqa):
    """{split: records}, read once for the module (each read parses ~48k questions)."""
    return {split: easy_vqa_captions(split) for split in ("train", "test")}


def stated_facts(easy_vqa, split):
    """{image id: {colour/shape words}} from the 'what ...?' questions alone, whose answers name them."""
    facts = {}
    for text, answer, image_id in zip(*getattr(easy_vqa, f"get_{split}_questions")()):
        if answer in COLOURS + SHAPES:
            words = set(re.findall(r"[a-z]+", text)) & set(COLOURS + SHAPES)
            facts.setdefault(image_id, set()).update(words | {answer})
    return facts


def test_easy_vqa_captions_state_the_metadatas_colour_and_shape(easy_vqa, easy_records):
    for split, n_images in (("train", 4000), ("test", 1000)):
        records = easy_records[split]
        assert len(getattr(easy_vqa, f"get_{split}_image_paths")()) == n_images
        assert n_images - 60 < len(records) <= n_images  # images no answer describes are left out
        by_id = {int(r.image_id.split("/")[1]): r for r in records}
        for image_id, words in stated_facts(easy_vqa, split).items():
            for caption in by_id[image_id].captions:
                assert all(re.search(rf"\b{w}\b", caption) for w in words), (image_id, caption, words)
        for record in records:
            assert 1 <= len(record.captions) <= 5 and record.generated and record.split == split
            mentioned = {w for c in record.captions for w in re.findall(r"[a-z]+", c)}
            assert len(mentioned & set(COLOURS)) <= 1 and len(mentioned & set(SHAPES)) <= 1  # one of each


def test_easy_vqa_first_train_image(easy_records):
    # train image 0: "what is the blue shape?" -> rectangle, "what color is the shape?" -> blue
    first = easy_records["train"][0]
    assert first.image == "train/images/0.png" and first.image_id == "train/0"
    assert first.captions == ("a blue rectangle.", "a rectangle that is blue.", "a picture of a blue shape: a rectangle.",
                              "an image containing a blue rectangle.", "the rectangle in this image is blue.")


def test_easy_vqa_images_are_relative_to_the_package_data(easy_records):
    root = easy_vqa_image_root()
    records = easy_records["test"]
    assert root.is_dir() and all((root / r.image).is_file() for r in records[:50])


def test_easy_vqa_captions_are_deterministic_and_both_splits_by_default(easy_records):
    assert easy_vqa_captions() == easy_records["train"] + easy_records["test"]  # a second, fresh read
    short = easy_vqa_captions("test", max_captions=2)
    assert [r.captions for r in short] == [r.captions[:2] for r in easy_records["test"]]
    assert "GENERATED CAPTIONS" in GENERATED_CAPTIONS_NOTICE and "not written by people" in GENERATED_CAPTIONS_NOTICE


@pytest.mark.parametrize("kwargs", [{"split": "val"}, {"max_captions": 0}, {"max_captions": 6}])
def test_easy_vqa_arguments_are_checked(easy_vqa, kwargs):
    with pytest.raises(DataError):
        easy_vqa_captions(**kwargs)
