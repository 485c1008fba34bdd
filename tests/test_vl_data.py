"""VQA and NoCaps readers (aape.vl.data): VQAv2's and NoCaps' published formats on small files,
easy-VQA's questions, the VQA parquet artifact and the split of questions by the retrieval images."""

import json
import logging

import pytest

from aape.data.captions import CaptionedImage, CaptionFileError, easy_vqa_captions, read_karpathy
from aape.data.images import DataError
from aape.layout import Layout
from aape.vl.data import (
    VQAItem,
    easy_vqa_questions,
    nocaps_domains,
    nocaps_test_refused,
    read_nocaps,
    read_vqa_split,
    read_vqav2,
    split_by_images,
    vqa_file,
    write_vqa_split,
)


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def answers(*texts):
    """VQAv2's 10 answers per question, as its annotation files give them."""
    assert len(texts) == 10
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


QUESTIONS = {
    "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": "val2014",
    "questions": [
        {"image_id": 42, "question": "What color is the bus? ", "question_id": 420},
        {"image_id": 391895, "question": "Is the man riding a motorcycle?", "question_id": 3918950},
        {"image_id": 42, "question": "How many people are there?", "question_id": 421},
    ],
}  # fmt: skip
ANNOTATIONS = {
    "info": {}, "license": {}, "data_type": "mscoco", "data_subtype": "val2014",
    "annotations": [  # not in the questions' order: the join is on question_id
        {"question_id": 3918950, "image_id": 391895, "question_type": "is the man", "answer_type": "yes/no",
         "multiple_choice_answer": "yes", "answers": answers(*["yes"] * 9, "no")},
        {"question_id": 421, "image_id": 42, "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": "2", "answers": answers(*["2"] * 7, "3", "3", "two")},
        {"question_id": 420, "image_id": 42, "question_type": "what color is the", "answer_type": "other",
         "multiple_choice_answer": "red", "answers": answers(*["red"] * 8, "orange", "red and white")},
    ],
}  # fmt: skip


def vqav2_files(tmp_path, questions=QUESTIONS, annotations=ANNOTATIONS):
    folder = tmp_path / "vqav2"
    return (write_json(folder / "v2_OpenEnded_mscoco_val2014_questions.json", questions),
            write_json(folder / "v2_mscoco_val2014_annotations.json", annotations))


def test_vqav2_joins_answers_on_question_id_in_question_order(tmp_path):
    items = read_vqav2(*vqav2_files(tmp_path), "val")
    assert [q.question_id for q in items] == ["420", "3918950", "421"]
    first = items[0]
    assert first == VQAItem("val2014/COCO_val2014_000000000042.jpg", "42", "420", "What color is the bus?",
                            ("red",) * 8 + ("orange", "red and white"))
    assert items[1].answers == ("yes",) * 9 + ("no",) and items[2].answers[-1] == "two"
    assert all(len(q.answers) == 10 for q in items)


def test_vqav2_image_path_format(tmp_path):
    items = read_vqav2(*vqav2_files(tmp_path), "val")
    assert items[0].image == "val2014/COCO_val2014_000000000042.jpg"
    assert items[1].image == "val2014/COCO_val2014_000000391895.jpg"


def test_vqav2_image_ids_join_karpathys_coco_records(tmp_path):
    karpathy = {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test", "cocoid": 391895,
         "sentences": [{"raw": "A man riding a motorcycle."}]},
    ]}  # fmt: skip
    record = read_karpathy(write_json(tmp_path / "coco" / "dataset_coco.json", karpathy))[0]
    item = read_vqav2(*vqav2_files(tmp_path), "val")[1]
    assert (item.image_id, item.image) == (record.image_id, record.image)  # same id and same path under coco/


def test_vqav2_unannotated_question_names_the_question_id(tmp_path):
    annotations = {**ANNOTATIONS, "annotations": ANNOTATIONS["annotations"][:2]}  # 420 lacks one
    questions_file, annotations_file = vqav2_files(tmp_path, annotations=annotations)
    with pytest.raises(CaptionFileError, match="no annotation for question_id 420") as info:
        read_vqav2(questions_file, annotations_file, "val")
    assert str(annotations_file) in str(info.value) and "\n" not in str(info.value)


def test_vqav2_image_id_disagreement_is_named(tmp_path):
    questions = {**QUESTIONS, "questions": [{**QUESTIONS["questions"][0], "image_id": 43}, *QUESTIONS["questions"][1:]]}
    questions_file, annotations_file = vqav2_files(tmp_path, questions=questions)
    with pytest.raises(CaptionFileError, match=r"question_id 420 is about image_id 42.*says 43") as info:
        read_vqav2(questions_file, annotations_file, "val")
    assert str(annotations_file) in str(info.value)


def test_vqav2_checks_subset_and_entries(tmp_path):
    files = vqav2_files(tmp_path)
    with pytest.raises(CaptionFileError, match="val2014.*not train2014"):
        read_vqav2(*files, "train")
    with pytest.raises(DataError, match="EvalAI"):
        read_vqav2(*files, "test")
    bad = {**ANNOTATIONS, "annotations": [{**ANNOTATIONS["annotations"][0], "answers": []}]}
    with pytest.raises(CaptionFileError, match=r"annotations\[0\] \(question_id 3918950\) has no 'answers'"):
        read_vqav2(*vqav2_files(tmp_path, annotations=bad), "val")
    with pytest.raises(CaptionFileError, match="does not exist"):
        read_vqav2(tmp_path / "missing.json", files[1], "val")


@pytest.fixture(scope="module")
def easy_test():
    pytest.importorskip("easy_vqa")
    return easy_vqa_questions("test")


def test_easy_vqa_questions_match_the_package_and_its_captions(easy_test):
    import easy_vqa

    questions, answers_, image_ids = easy_vqa.get_test_questions()
    assert len(easy_test) == len(questions) == 9673
    assert easy_test[0] == VQAItem("test/images/0.png", "test/0", "test/0", questions[0], (answers_[0],))
    captions = {r.image_id: r for r in easy_vqa_captions("test")}
    for item, image_id in zip(easy_test[:20], image_ids):
        record = captions[f"test/{image_id}"]
        assert (item.image_id, item.image) == (record.image_id, record.image)
    with pytest.raises(DataError, match="splits train, test"):
        easy_vqa_questions("val")


NOCAPS = {
    "licenses": [], "info": {},
    "images": [
        {"id": 0, "file_name": "0013ea2087020901.jpg", "open_images_id": "0013ea2087020901", "domain": "in-domain",
         "height": 1024, "width": 732, "coco_url": "https://example.invalid/0.jpg"},
        {"id": 1, "file_name": "00223d4ba8ce0a14.jpg", "open_images_id": "00223d4ba8ce0a14", "domain": "out-domain",
         "height": 683, "width": 1024, "coco_url": "https://example.invalid/1.jpg"},
    ],
    "annotations": [{"image_id": k % 2, "id": k, "caption": f"caption {k} "} for k in range(20)],
}  # fmt: skip


def test_nocaps_val_captions_and_domains(tmp_path):
    path = write_json(tmp_path / "nocaps" / "nocaps_val_4500_captions.json", NOCAPS)
    records = read_nocaps(path)
    assert [r.image for r in records] == ["validation/0013ea2087020901.jpg", "validation/00223d4ba8ce0a14.jpg"]
    assert [r.image_id for r in records] == ["0", "1"] and {r.split for r in records} == {"val"}
    assert records[0].captions == tuple(f"caption {k}" for k in range(0, 20, 2)) and len(records[1].captions) == 10
    assert nocaps_domains(path) == {"0": "in-domain", "1": "out-domain"}


def test_nocaps_bad_domain_and_uncaptioned_image_are_named(tmp_path):
    bad = {**NOCAPS, "images": [{**NOCAPS["images"][0], "domain": "indoor"}, NOCAPS["images"][1]]}
    with pytest.raises(CaptionFileError, match=r"images\[0\] \(id 0\) has domain 'indoor'"):
        read_nocaps(write_json(tmp_path / "a.json", bad))
    cut = {**NOCAPS, "annotations": [a for a in NOCAPS["annotations"] if a["image_id"] == 0]}
    with pytest.raises(CaptionFileError, match="1 image.*00223d4ba8ce0a14.jpg"):
        read_nocaps(write_json(tmp_path / "b.json", cut))


def test_nocaps_test_is_refused(tmp_path):
    with pytest.raises(DataError, match="EvalAI.*val split"):
        nocaps_test_refused()
    info_only = {"images": NOCAPS["images"]}  # nocaps_test_image_info.json: no captions
    with pytest.raises(DataError, match="private and scored only on the EvalAI server"):
        read_nocaps(write_json(tmp_path / "nocaps_test_image_info.json", info_only))
    with pytest.raises(DataError, match="EvalAI"):
        read_nocaps(write_json(tmp_path / "renamed.json", info_only))


ITEMS = [
    VQAItem("val2014/COCO_val2014_000000000042.jpg", "42", "420", "What color is the bus?", ("red",) * 10),
    VQAItem("val2014/COCO_val2014_000000000007.jpg", "7", "70", "Is it raining?", ("yes", "no")),
    VQAItem("val2014/COCO_val2014_000000000042.jpg", "42", "421", "How many?", ("2",)),
    VQAItem("val2014/COCO_val2014_000000000099.jpg", "99", "990", "Where?", ("here",)),
]


def test_vqa_artifact_round_trip(tmp_path):
    layout = Layout(tmp_path, tmp_path / "cache")
    path = write_vqa_split(layout, "val", ITEMS)
    assert path == vqa_file(layout, "val") == layout.data / "vqa_val.parquet"
    assert read_vqa_split(layout, "val") == ITEMS
    assert not list(layout.data.glob(".*.tmp"))  # the atomic writer left no temporary file
    write_vqa_split(layout, "empty", [])
    assert read_vqa_split(layout, "empty") == []


def test_vqa_artifact_missing_says_to_run_prepare_data(tmp_path):
    with pytest.raises(DataError, match=r"aape prepare-data` with run.task: vqa"):
        read_vqa_split(Layout(tmp_path, tmp_path / "cache"), "test")


def image(image_id, split):
    return CaptionedImage(f"val2014/{image_id}.jpg", ("a caption.",), split, image_id)


def test_split_by_images_follows_the_image_splits(caplog):
    splits = {"train": [image("7", "train")], "val": [], "test": [image("42", "test")]}
    with caplog.at_level(logging.INFO, logger="aape.vl.data"):
        result = split_by_images(ITEMS, splits)
    found = {k: [q.question_id for q in v] for k, v in result.items()}
    assert found == {"train": ["70"], "val": [], "test": ["420", "421"]}
    assert "dropped 1 of 4" in caplog.text  # image 99 is in no split


def test_split_by_images_refuses_overlapping_splits():
    with pytest.raises(DataError, match="image_id '42'.*'train' and 'test'"):
        split_by_images(ITEMS, {"train": [image("42", "train")], "test": [image("42", "test")]})
