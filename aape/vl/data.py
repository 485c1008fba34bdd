"""Visual question answering and NoCaps captions: the files people have, as typed records, and the
VQA artifact prepare-data writes.

Expected layouts under data.root (paths in the records are relative to the dataset's folder):

    vqav2/v2_OpenEnded_mscoco_{train,val}2014_questions.json   VQAv2's questions (read_vqav2)
    vqav2/v2_mscoco_{train,val}2014_annotations.json           VQAv2's answers, 10 per question
    coco/{train,val}2014/COCO_{subset}2014_*.jpg                -> image "val2014/COCO_val2014_....jpg"
    nocaps/nocaps_val_4500_captions.json                        NoCaps validation captions (read_nocaps)
    nocaps/validation/<file_name>                               -> image "validation/<file_name>"

VQAv2's images are COCO's: a VQAItem's image is relative to coco/, the folder Karpathy's COCO
records (aape.data.captions.read_karpathy) are relative to, so both give the same path for an image.

Sources of the formats:
- VQAv2 (Goyal et al., 2017), https://visualqa.org/download.html: the questions file is
  {"questions": [{"image_id", "question", "question_id"}], "data_subtype": "val2014", ...}, the
  annotations file {"annotations": [{"question_id", "image_id", "answers": [{"answer",
  "answer_confidence", "answer_id"}] (10), "multiple_choice_answer", ...}], ...}. Test-dev and
  test-std answers are private (EvalAI), so only the train and val subsets are read.
- NoCaps (Agrawal et al., 2019), https://nocaps.org/download: COCO's caption format, {"images":
  [{"id", "file_name", "open_images_id", "domain", ...}], "annotations": [{"image_id", "caption",
  "id"}]}, 10 captions per image; the images are downloaded (from their coco_url) into
  nocaps/validation/. Its test captions are private too: only the val split is read.
- easy-VQA (the PyPI package easy-vqa): generated questions about one shape per image, 1 answer each.

Joins: VQAItem.image_id equals the CaptionedImage.image_id of the same image in that dataset's
caption records, so questions follow the retrieval data's image splits (split_by_images):
- VQAv2 <-> Karpathy's COCO: str(COCO image id), e.g. "42"; Karpathy's records use str(cocoid)
  (read_karpathy) and COCO's caption files str(id) (read_coco_captions), the same string.
- easy-VQA: "<split>/<id>", as easy_vqa_captions gives, e.g. "test/0" (ids repeat across splits).
- NoCaps: str(NoCaps image id), e.g. "0"; its domain (in-domain, near-domain, out-domain) comes
  from nocaps_domains, keyed the same way.

The artifact: data/vqa_{split}.parquet, one row per question (image, image_id, question_id,
question, answers as a list of strings), written by write_vqa_split and read by read_vqa_split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pyarrow as pa
import pyarrow.parquet as pq

from aape.atomic import atomic_write_stream
from aape.data.captions import EASY_VQA_SPLITS, CaptionedImage, CaptionFileError, list_field, load_json_object, text_field
from aape.data.images import DataError
from aape.layout import Layout

log = logging.getLogger(__name__)

VQAV2_SUBSETS = ("train", "val")  # the subsets with public answers
# the files' names as the datasets ship them (under data.root/vqav2/ and data.root/nocaps/)
VQAV2_FILES = {subset: (f"v2_OpenEnded_mscoco_{subset}2014_questions.json", f"v2_mscoco_{subset}2014_annotations.json")
               for subset in VQAV2_SUBSETS}
NOCAPS_FILE = "nocaps_val_4500_captions.json"
NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")
SCHEMA = pa.schema([
    ("image", pa.string()), ("image_id", pa.string()), ("question_id", pa.string()),
    ("question", pa.string()), ("answers", pa.list_(pa.string())),
])  # fmt: skip
_SHOW = 5  # culprits an error message lists


@dataclass(frozen=True, slots=True)
class VQAItem:
    image: str  # POSIX path relative to the dataset's folder (see the module docstring)
    image_id: str  # equals the CaptionedImage.image_id of the same image (see "Joins" above)
    question_id: str
    question: str
    answers: tuple[str, ...]  # every ground-truth answer: 10 for VQAv2, 1 for easy-VQA


# --- easy-VQA -----------------------------------------------------------------------------------


def easy_vqa_questions(split: str) -> list[VQAItem]:
    """Every easy-VQA question of split 'train' (38,575) or 'test' (9,673), in the package's order;
    image and image_id as easy_vqa_captions gives them, question_id "<split>/<index>"."""
    if split not in EASY_VQA_SPLITS:
        raise DataError(f"easy-VQA has splits {', '.join(EASY_VQA_SPLITS)}; got split={split!r}")
    module = _easy_vqa()
    questions, answers, image_ids = getattr(module, f"get_{split}_questions")()
    images = getattr(module, f"get_{split}_image_paths")()  # {image id: file}
    items = []
    for index, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids)):
        if image_id not in images:
            raise DataError(f"easy-VQA {split} question {index} ({question!r}) is about image {image_id}, "
                            f"which has no file; reinstall easy-vqa")
        items.append(VQAItem(f"{split}/images/{image_id}.png", f"{split}/{image_id}", f"{split}/{index}",
                             question, (answer,)))
    return items


def _easy_vqa() -> Any:
    try:
        import easy_vqa
    except ImportError:
        raise DataError("the easy-VQA demo needs the easy-vqa package: pip install easy-vqa") from None
    return easy_vqa


# --- VQAv2 --------------------------------------------------------------------------------------


def vqav2_image(subset: str, image_id: int) -> str:
    """The COCO image a VQAv2 question is about, relative to coco/ (as Karpathy's records are)."""
    return f"{subset}2014/COCO_{subset}2014_{image_id:012d}.jpg"


def read_vqav2(questions_file: Path, annotations_file: Path, subset: str) -> list[VQAItem]:
    """VQAv2's questions of one subset ('train' or 'val') in the questions file's order, each with
    its 10 answers from the annotations file (joined on question_id). Annotations of questions the
    questions file lacks are ignored; a question without one is an error."""
    if subset not in VQAV2_SUBSETS:
        raise DataError(
            f"VQAv2 subset {subset!r} cannot be read: only {', '.join(VQAV2_SUBSETS)} have public answers "
            f"(test-dev and test-std are scored on the EvalAI server); use subset 'val' for evaluation"
        )
    questions_file, annotations_file = Path(questions_file), Path(annotations_file)
    questions = _vqa_list(questions_file, "questions", subset, f"v2_OpenEnded_mscoco_{subset}2014_questions.json")
    annotations = _vqa_list(annotations_file, "annotations", subset, f"v2_mscoco_{subset}2014_annotations.json")
    answers = _vqav2_answers(annotations, annotations_file)
    items, seen = [], set()
    for i, entry in enumerate(questions):
        item = _vqav2_item(entry, i, questions_file, annotations_file, answers, subset)
        if item.question_id in seen:
            raise CaptionFileError(f"{questions_file}: questions[{i}] repeats question_id {item.question_id}")
        seen.add(item.question_id)
        items.append(item)
    return items


def _vqa_list(path: Path, key: str, subset: str, official: str) -> list:
    """The file's `key` list, after checking the file is of `subset` (its data_subtype, when given)."""
    data = load_json_object(path, "VQAv2 file")
    subtype = data.get("data_subtype")
    if subtype is not None and subtype != f"{subset}2014":
        raise CaptionFileError(
            f"{path} holds VQAv2's {subtype!r} data, not {subset}2014; pass {official} for subset {subset!r}"
        )
    return list_field(data, key, path, f"VQAv2's {official}", "VQAv2 file")


def _vqav2_answers(annotations: list, path: Path) -> dict[int, tuple[int, tuple[str, ...]]]:
    """{question_id: (image_id, answers)} from the annotations file."""
    answers: dict[int, tuple[int, tuple[str, ...]]] = {}
    for k, entry in enumerate(annotations):
        where = f"{path}: annotations[{k}]"
        question_id, image_id = _int_field(entry, "question_id", where), _int_field(entry, "image_id", where)
        where = f"{where} (question_id {question_id})"
        listed = entry.get("answers")
        if not isinstance(listed, list) or not listed:
            raise CaptionFileError(f"{where} has no 'answers' list (got {listed!r}); re-download the annotations")
        texts = tuple(_answer_text(a, j, where) for j, a in enumerate(listed))
        if question_id in answers:
            raise CaptionFileError(f"{where} repeats question_id {question_id}; each question has one annotation")
        answers[question_id] = (image_id, texts)
    return answers


def _answer_text(answer: Any, j: int, where: str) -> str:
    text = answer.get("answer") if isinstance(answer, dict) else None
    if not isinstance(text, str):
        raise CaptionFileError(f"{where}: answers[{j}] has no 'answer' text (got {answer!r})")
    return text


def _vqav2_item(
    entry: Any, i: int, questions_file: Path, annotations_file: Path,
    answers: dict[int, tuple[int, tuple[str, ...]]], subset: str,
) -> VQAItem:  # fmt: skip
    where = f"{questions_file}: questions[{i}]"
    question_id, image_id = _int_field(entry, "question_id", where), _int_field(entry, "image_id", where)
    question = text_field(entry, "question", f"{where} (question_id {question_id})").strip()
    if question_id not in answers:
        raise CaptionFileError(
            f"{annotations_file} has no annotation for question_id {question_id} ({where}); pass the "
            f"annotations file of the same subset ({subset}2014)"
        )
    annotated_image, texts = answers[question_id]
    if annotated_image != image_id:
        raise CaptionFileError(
            f"{annotations_file}: question_id {question_id} is about image_id {annotated_image}, but {where} "
            f"says {image_id}; the two files disagree: re-download both"
        )
    return VQAItem(vqav2_image(subset, image_id), str(image_id), str(question_id), question, texts)


# --- NoCaps -------------------------------------------------------------------------------------


def nocaps_test_refused(path: Path | str | None = None) -> NoReturn:
    """NoCaps' test captions are private: nothing here can score the test split."""
    about = f"{path}: " if path is not None else ""
    raise DataError(
        f"{about}NoCaps test references are private and scored only on the EvalAI server; "
        f"use the val split (nocaps_val_4500_captions.json) instead"
    )


def read_nocaps(path: Path) -> list[CaptionedImage]:
    """NoCaps' validation images in the file's order, each with its captions (10) in annotation
    order: image "validation/<file_name>", split "val", image_id str(id). Domains: nocaps_domains."""
    return _read_nocaps(Path(path))[0]


def nocaps_domains(path: Path) -> dict[str, str]:
    """{image_id: in-domain | near-domain | out-domain} of the NoCaps file, keyed as read_nocaps'
    records; a separate reader so CaptionedImage stays the one caption record type."""
    return _read_nocaps(Path(path))[1]


def _read_nocaps(path: Path) -> tuple[list[CaptionedImage], dict[str, str]]:
    if "nocaps_test" in path.name:  # e.g. nocaps_test_image_info.json
        nocaps_test_refused(path)
    data = load_json_object(path, "NoCaps file")
    if "annotations" not in data and isinstance(data.get("images"), list):
        nocaps_test_refused(path)  # the test file (image info only) has no captions to read
    shape = 'NoCaps\' {"images": [...], "annotations": [...]}'
    images = list_field(data, "images", path, shape, "NoCaps file")
    annotations = list_field(data, "annotations", path, shape, "NoCaps file")
    names, domains = _nocaps_images(images, path)
    captions: dict[int, list[str]] = {image_id: [] for image_id in names}
    for k, annotation in enumerate(annotations):
        where = f"{path}: annotations[{k}]"
        image_id = _int_field(annotation, "image_id", where)
        if image_id not in captions:
            raise CaptionFileError(f"{where} names image_id {image_id}, which 'images' does not list")
        captions[image_id].append(text_field(annotation, "caption", f"{where} (image_id {image_id})").strip())
    _check_captioned(captions, names, path)
    records = [CaptionedImage(f"validation/{names[i]}", tuple(captions[i]), "val", str(i)) for i in names]
    return records, {str(i): domains[i] for i in names}


def _nocaps_images(images: list, path: Path) -> tuple[dict[int, str], dict[int, str]]:
    """({image id: file name}, {image id: domain}), in the file's order; ids must be unique."""
    names: dict[int, str] = {}
    domains: dict[int, str] = {}
    for i, image in enumerate(images):
        where = f"{path}: images[{i}]"
        image_id = _int_field(image, "id", where)
        where = f"{where} (id {image_id})"
        if image_id in names:
            raise CaptionFileError(f"{where} repeats image id {image_id}")
        names[image_id] = text_field(image, "file_name", where)
        domain = image.get("domain")
        if domain not in NOCAPS_DOMAINS:
            raise CaptionFileError(f"{where} has domain {domain!r}; NoCaps' domains are {', '.join(NOCAPS_DOMAINS)}")
        domains[image_id] = domain
    return names, domains


def _check_captioned(captions: dict[int, list[str]], names: dict[int, str], path: Path) -> None:
    """Every NoCaps val image has captions: one without any means a cut or wrong file."""
    missing = [names[i] for i, texts in captions.items() if not texts]
    if missing:
        shown = ", ".join(missing[:_SHOW]) + (" ..." if len(missing) > _SHOW else "")
        raise CaptionFileError(f"{path}: {len(missing)} image(s) have no caption: {shown}; re-download the file")


# --- the artifact -------------------------------------------------------------------------------


def vqa_file(layout: Layout, split: str) -> Path:
    return layout.data / f"vqa_{split}.parquet"


def write_vqa_split(layout: Layout, split: str, items: list[VQAItem]) -> Path:
    rows = [{"image": q.image, "image_id": q.image_id, "question_id": q.question_id, "question": q.question,
             "answers": list(q.answers)} for q in items]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    return atomic_write_stream(vqa_file(layout, split), lambda handle: pq.write_table(table, handle))


def read_vqa_split(layout: Layout, split: str) -> list[VQAItem]:
    path = vqa_file(layout, split)
    if not path.is_file():
        raise DataError(f"{path} is missing: run `aape prepare-data` with run.task: vqa first")
    table = pq.read_table(path)
    if set(SCHEMA.names) - set(table.column_names):
        raise DataError(f"{path} lacks columns {sorted(set(SCHEMA.names) - set(table.column_names))}: it was "
                        f"written by another version; re-run `aape prepare-data` with run.task: vqa")
    return [VQAItem(r["image"], r["image_id"], r["question_id"], r["question"], tuple(r["answers"]))
            for r in table.select(SCHEMA.names).to_pylist()]


def split_by_images(items: list[VQAItem], splits: dict[str, list[CaptionedImage]]) -> dict[str, list[VQAItem]]:
    """{split: its images' questions, in `items`' order}, for every split in `splits` (the
    retrieval data's, so VQA never tests on an image it trained on); questions about an image in
    no split are dropped, with a log line."""
    owner: dict[str, str] = {}
    for name, records in splits.items():
        for record in records:
            if owner.setdefault(record.image_id, name) != name:
                raise DataError(f"image_id {record.image_id!r} ({record.image}) is in splits "
                                f"{owner[record.image_id]!r} and {name!r}; the image splits must be disjoint")
    result: dict[str, list[VQAItem]] = {name: [] for name in splits}
    dropped = 0
    for item in items:
        if item.image_id in owner:
            result[owner[item.image_id]].append(item)
        else:
            dropped += 1
    if dropped:
        log.info("dropped %d of %d question(s) whose image is in no split", dropped, len(items))
    return result


# --- shared checks ------------------------------------------------------------------------------


def _int_field(entry: Any, key: str, where: str) -> int:
    value = entry.get(key) if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise CaptionFileError(f"{where} has no integer {key!r} (got {value!r})")
    return value


