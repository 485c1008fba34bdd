"""Captioned images for image-text retrieval: the caption files people have, as one record list.

AAPE's retrieval experiments use each image's human captions as the natural-language prompts, on
COCO (Karpathy's 5k test split) and Flickr30k (its 1k test split), and report Recall@1/5/10.

Expected layouts under data.root (paths in the records are relative to the dataset's folder):

    coco/dataset_coco.json                  Karpathy's split file
    coco/train2014/COCO_train2014_*.jpg      -> image "train2014/COCO_train2014_....jpg"
    coco/val2014/COCO_val2014_*.jpg
    coco/annotations/captions_{train,val}2014.json   COCO's own captions (read_coco_captions)
    flickr30k/dataset_flickr30k.json
    flickr30k/flickr30k-images/*.jpg         -> image "flickr30k-images/1000092795.jpg"
    flickr8k/dataset_flickr8k.json
    flickr8k/Flicker8k_Dataset/*.jpg         (sic: the folder name the official archive unpacks to)

Karpathy's splits are train, restval, val and test. "restval" is the part of COCO's val2014 that
is neither val nor test; the literature trains on it (train + restval = 113k images), so it is a
training split, kept under its own name in `split`. Some COCO images have 6 or 7 captions; the
usual 25,000 test captions are the first 5 of each (`max_captions=5`).

Images without captions are an error by default (a retrieval query with no right answer is
undefined); `allow_uncaptioned=True` drops them and logs how many.

The offline demo, `easy_vqa_captions`, derives captions from easy-VQA's question/answer metadata:
they are generated, not human, and marked so (`generated=True`, GENERATED_CAPTIONS_NOTICE).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

from aape.data.images import DataError

log = logging.getLogger(__name__)

KARPATHY_SPLITS = ("train", "restval", "val", "test")
TRAINING_SPLITS = ("train", "restval")  # what the literature trains on
# the folder, inside the dataset's folder, that each Karpathy file's image names live in
KARPATHY_IMAGE_FOLDERS = {"coco": "", "flickr30k": "flickr30k-images", "flickr8k": "Flicker8k_Dataset"}
GENERATED_CAPTIONS_NOTICE = (
    "GENERATED CAPTIONS: easy-VQA captions are derived from its question/answer metadata, not written by people"
)
_SHOW = 5  # culprits an error message lists


class CaptionFileError(DataError):
    """A caption file is missing or malformed; the message names the file and the bad entry."""


@dataclass(frozen=True, slots=True)
class CaptionedImage:
    image: str  # POSIX path relative to the dataset's folder (see the module docstring)
    captions: tuple[str, ...]
    split: str  # as the source names it: train, restval, val, test
    image_id: str  # the dataset's own id: COCO's image id, the Flickr photo id (file stem)
    generated: bool = False  # True when the captions were made by a program, not by people


def flatten_captions(records: Sequence[CaptionedImage]) -> tuple[list[str], list[int]]:
    """(all captions, each caption's record index): the columns and `image_of_caption` of
    aape.retrieval.metrics.recall_at_k, for the records in this order."""
    captions = [c for record in records for c in record.captions]
    owners = [i for i, record in enumerate(records) for _ in record.captions]
    return captions, owners


# --- Karpathy's split files ---------------------------------------------------------------------


def read_karpathy(
    path: str | Path,
    image_root_hint: str | None = None,
    *,
    allow_uncaptioned: bool = False,
    max_captions: int | None = None,
) -> list[CaptionedImage]:
    """Every image of a Karpathy split file (dataset_coco/flickr30k/flickr8k.json), all splits, in
    file order; filter on `split` for one.

    Paths: COCO's are filepath/filename ("val2014/COCO_val2014_....jpg"), Flickr's are filename
    under the layout's image folder. `image_root_hint` overrides that folder (a relative POSIX
    path put in front of every image; "" for none); None takes KARPATHY_IMAGE_FOLDERS[dataset].
    Captions are the sentences' `raw` text, stripped; `max_captions` keeps the first n."""
    path = Path(path)
    data = load_json_object(path)
    entries = list_field(data, "images", path, 'Karpathy\'s {"images": [...], "dataset": ...}')
    dataset = data.get("dataset")
    prefix = _image_prefix(image_root_hint, dataset, path)
    _check_max_captions(max_captions)
    records, uncaptioned, seen = [], [], set()
    for i, entry in enumerate(entries):
        record = _karpathy_record(entry, i, prefix, dataset, path, max_captions)
        if record.image in seen:
            raise CaptionFileError(f"{path}: images[{i}] repeats image {record.image!r}; each image must appear once")
        seen.add(record.image)
        (records if record.captions else uncaptioned).append(record)
    return _drop_uncaptioned(records, uncaptioned, path, allow_uncaptioned)


def _karpathy_record(
    entry: Any, i: int, prefix: str, dataset: Any, path: Path, max_captions: int | None
) -> CaptionedImage:
    if not isinstance(entry, dict):
        raise CaptionFileError(f"{path}: images[{i}] is a {type(entry).__name__}, not an object")
    where = f"{path}: images[{i}]"
    filename = text_field(entry, "filename", where)
    where = f"{where} ({filename})"
    split = text_field(entry, "split", where)
    if split not in KARPATHY_SPLITS:
        raise CaptionFileError(f"{where} has split {split!r}; Karpathy's splits are {', '.join(KARPATHY_SPLITS)}")
    folder = text_field(entry, "filepath", where) if "filepath" in entry else ""  # COCO's train2014/val2014
    relative = PurePosixPath(prefix, folder, filename)
    sentences = entry.get("sentences")
    if not isinstance(sentences, list):
        raise CaptionFileError(f"{where} has no 'sentences' list (got {type(sentences).__name__})")
    captions = tuple(_sentence_text(s, j, where) for j, s in enumerate(sentences))[:max_captions]
    image_id = str(entry["cocoid"]) if dataset == "coco" and "cocoid" in entry else PurePosixPath(filename).stem
    return CaptionedImage(relative.as_posix(), captions, split, image_id)


def _sentence_text(sentence: Any, j: int, where: str) -> str:
    raw = sentence.get("raw") if isinstance(sentence, dict) else None
    if not isinstance(raw, str) or not raw.strip():
        raise CaptionFileError(
            f"{where}: sentences[{j}] has no text (its 'raw' is {raw!r}); every sentence needs its caption"
        )
    return raw.strip()


def _image_prefix(hint: str | None, dataset: Any, path: Path) -> str:
    """The image folder in front of every file name; must stay inside the dataset's folder."""
    if hint is None:
        if dataset not in KARPATHY_IMAGE_FOLDERS:
            log.warning("%s: dataset %r is none of %s; image paths are bare file names (pass image_root_hint)",
                        path, dataset, ", ".join(KARPATHY_IMAGE_FOLDERS))
        return KARPATHY_IMAGE_FOLDERS.get(dataset, "")
    hinted = PurePosixPath(hint)
    if hinted.is_absolute() or ".." in hinted.parts:
        raise CaptionFileError(
            f"image_root_hint {hint!r} for {path} must be a relative folder inside the dataset's folder "
            f"(e.g. 'flickr30k-images'), with no '..'"
        )
    return "" if hint in ("", ".") else hinted.as_posix()


def _check_max_captions(max_captions: int | None) -> None:
    if max_captions is None:
        return
    if isinstance(max_captions, bool) or not isinstance(max_captions, int) or max_captions < 1:
        raise CaptionFileError(f"max_captions must be a positive integer or None; got {max_captions!r}")


# --- COCO's own caption files -------------------------------------------------------------------

_COCO_NAME = re.compile(r"captions_(train|val)(\d{4})\.json$")


def read_coco_captions(path: str | Path, *, allow_uncaptioned: bool = False) -> list[CaptionedImage]:
    """COCO's annotations/captions_{train,val}2014.json: images in the file's order, each with its
    captions in annotation order, split and image folder from the file name (val2014 -> split
    'val', images "val2014/<file_name>"). These are COCO's splits, not Karpathy's."""
    path = Path(path)
    match = _COCO_NAME.search(path.name)
    if not match:
        raise CaptionFileError(
            f"cannot tell the split of {path} from its name: COCO's files are named captions_train2014.json "
            f"and captions_val2014.json (captions_<split><year>.json); rename it accordingly"
        )
    split, folder = match.group(1), match.group(1) + match.group(2)
    data = load_json_object(path)
    shape = 'COCO\'s {"images": [...], "annotations": [...]}'
    images = list_field(data, "images", path, shape)
    annotations = list_field(data, "annotations", path, shape)
    names = _coco_images(images, path)
    captions: dict[Any, list[str]] = {image_id: [] for image_id in names}
    for k, annotation in enumerate(annotations):
        image_id, text = _coco_annotation(annotation, k, path)
        if image_id not in captions:
            raise CaptionFileError(f"{path}: annotations[{k}] names image_id {image_id!r}, which 'images' does not list")
        captions[image_id].append(text)
    records = [CaptionedImage(f"{folder}/{names[i]}", tuple(captions[i]), split, str(i)) for i in names]
    kept = [r for r in records if r.captions]
    return _drop_uncaptioned(kept, [r for r in records if not r.captions], path, allow_uncaptioned)


def _coco_images(images: list, path: Path) -> dict[Any, str]:
    """{image id: file name}, in the file's order; ids must be unique."""
    names: dict[Any, str] = {}
    for i, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image:
            raise CaptionFileError(f"{path}: images[{i}] is not an object with an 'id'")
        file_name = text_field(image, "file_name", f"{path}: images[{i}] (id {image['id']!r})")
        if image["id"] in names:
            raise CaptionFileError(f"{path}: images[{i}] repeats image id {image['id']!r}")
        names[image["id"]] = file_name
    return names


def _coco_annotation(annotation: Any, k: int, path: Path) -> tuple[Any, str]:
    if not isinstance(annotation, dict) or "image_id" not in annotation:
        raise CaptionFileError(f"{path}: annotations[{k}] is not an object with an 'image_id'")
    text = annotation.get("caption")
    if not isinstance(text, str) or not text.strip():
        raise CaptionFileError(
            f"{path}: annotations[{k}] (image_id {annotation['image_id']!r}) has no text (its 'caption' is {text!r})"
        )
    return annotation["image_id"], text.strip()


# --- shared checks ------------------------------------------------------------------------------


def load_json_object(path: Path, label: str = "caption file") -> dict:
    """A JSON file holding an object; a missing, malformed or non-object file is a CaptionFileError
    naming it (`label` says what kind of file it is: "caption file", "VQAv2 file", ...)."""
    if not path.is_file():
        raise CaptionFileError(
            f"{label} {path} does not exist; see aape/data/captions.py and aape/vl/data.py for where the files go "
            f"(e.g. <data.root>/coco/dataset_coco.json)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise CaptionFileError(f"{label} {path} is not valid JSON: {exc}; re-download or re-extract it") from None
    except UnicodeDecodeError as exc:
        raise CaptionFileError(f"{label} {path} is not UTF-8 text ({exc}); is it the right file?") from None
    if not isinstance(data, dict):
        raise CaptionFileError(f"{label} {path} holds a JSON {type(data).__name__}, not an object")
    return data


def list_field(data: dict, key: str, path: Path, shape: str, label: str = "caption file") -> list:
    value = data.get(key)
    if not isinstance(value, list):
        found = ", ".join(sorted(map(str, data))[:_SHOW]) or "nothing"
        raise CaptionFileError(f"{label} {path} has no {key!r} list (top-level keys: {found}); expected {shape}")
    return value


def text_field(entry: dict, key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise CaptionFileError(f"{where} has no {key!r} (got {value!r})")
    return value


def _drop_uncaptioned(
    records: list[CaptionedImage], uncaptioned: list[CaptionedImage], path: Path, allow: bool
) -> list[CaptionedImage]:
    if not uncaptioned:
        return records
    shown = ", ".join(r.image for r in uncaptioned[:_SHOW]) + (" ..." if len(uncaptioned) > _SHOW else "")
    if not allow:
        raise CaptionFileError(
            f"{path}: {len(uncaptioned)} image(s) have no caption: {shown}. Retrieval needs at least one per "
            f"image; pass allow_uncaptioned=True to drop them"
        )
    log.warning("%s: dropped %d image(s) without captions: %s", path, len(uncaptioned), shown)
    return records


# --- easy-VQA: an offline demo with generated captions ------------------------------------------

EASY_VQA_SPLITS = ("train", "test")
_SHAPES = ("circle", "rectangle", "triangle")
_TEMPLATES = {  # 5 phrasings per kind of known content; only stated facts, never the background
    "both": ("{a_c} {c} {s}.", "{a_s} {s} that is {c}.", "a picture of {a_c} {c} shape: {a_s} {s}.",
             "an image containing {a_c} {c} {s}.", "the {s} in this image is {c}."),
    "colour": ("{a_c} {c} shape.", "a shape that is {c}.", "a picture of {a_c} {c} shape.",
               "an image containing {a_c} {c} shape.", "the shape in this image is {c}."),
    "shape": ("{a_s} {s}.", "{a_s} {s} shape.", "a picture of {a_s} {s}.",
              "an image containing {a_s} {s}.", "the shape in this image is {a_s} {s}."),
}


def easy_vqa_image_root() -> Path:
    """The installed easy-VQA package's data folder: the records' image paths are relative to it."""
    return Path(_easy_vqa().__file__).resolve().parent / "data"


def easy_vqa_captions(split: str | None = None, max_captions: int = 5) -> list[CaptionedImage]:
    """Up to `max_captions` (1-5) generated captions per easy-VQA image, deterministically, for
    split 'train' (4000 images), 'test' (1000) or both (None); images "train/images/<id>.png"
    relative to easy_vqa_image_root(), ordered by id, image_id "<split>/<id>".

    Each image shows one shape of one colour. A caption states only what a question's answer
    says positively: the colour and/or shape. An image whose questions never state either (no
    question at all, or only "no" answers) gets no caption and is left out, with a log line.
    Every record has generated=True: see GENERATED_CAPTIONS_NOTICE.

    There are only 8 colours x 3 shapes, so many images share one caption set: as retrieval data,
    images of the same content cannot be told apart by their captions, and under the pessimistic
    tie rule of aape.retrieval.metrics their identical captions rank against each other. A demo
    should keep one image per content, or count same-content images as right answers."""
    if isinstance(max_captions, bool) or not isinstance(max_captions, int) or not 1 <= max_captions <= 5:
        raise DataError(f"max_captions must be 1 to 5 for easy-VQA captions; got {max_captions!r}")
    if split is not None and split not in EASY_VQA_SPLITS:
        raise DataError(f"easy-VQA has splits {', '.join(EASY_VQA_SPLITS)}; got split={split!r}")
    module = _easy_vqa()
    colours = [a for a in module.get_answers() if a not in (*_SHAPES, "yes", "no")]
    records = []
    for name in [split] if split else EASY_VQA_SPLITS:
        questions = getattr(module, f"get_{name}_questions")()
        paths = getattr(module, f"get_{name}_image_paths")()
        facts = _easy_vqa_facts(zip(*questions), set(paths), colours, name)
        records += _easy_vqa_records(facts, sorted(paths), name, max_captions)
    return records


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError:
        raise DataError("the easy-VQA demo needs the easy-vqa package: pip install easy-vqa") from None
    return easy_vqa


def _easy_vqa_facts(
    questions: Iterable[tuple[str, str, int]], image_ids: set[int], colours: Sequence[str], split: str
) -> dict[int, dict[str, str]]:
    """{image id: {'colour': ..., 'shape': ...}} from the answers that state them."""
    facts: dict[int, dict[str, str]] = {}
    for text, answer, image_id in questions:
        if image_id not in image_ids:
            raise DataError(f"easy-VQA {split} question {text!r} is about image {image_id}, which has no file")
        words = set(re.findall(r"[a-z]+", text.lower()))
        stated = _stated(words, answer, colours, text, split)
        known = facts.setdefault(image_id, {})
        for kind, value in stated.items():
            if known.setdefault(kind, value) != value:
                raise DataError(
                    f"easy-VQA {split} image {image_id}: its questions give two {kind}s, {known[kind]!r} and "
                    f"{value!r} (at {text!r}); the package's data is inconsistent"
                )
    return facts


def _stated(words: set[str], answer: str, colours: Sequence[str], text: str, split: str) -> dict[str, str]:
    """The colour and shape one question/answer states; {} for a 'no' about something present."""
    colour = next((w for w in colours if w in words), None)
    shape = next((w for w in _SHAPES if w in words), None)
    if answer in colours:  # "what color is the shape/circle?"
        return {"colour": answer, **({"shape": shape} if shape else {})}
    if answer in _SHAPES:  # "what shape is present?", "what is the blue shape?"
        return {"shape": answer, **({"colour": colour} if colour else {})}
    if answer not in ("yes", "no") or not (colour or shape):
        raise DataError(f"easy-VQA {split}: question {text!r} with answer {answer!r} is of no known form")
    negated = bool(words & {"not", "no"})  # "is there not a red shape?", "is no circle present?"
    if (answer == "yes") == negated:
        return {}  # says what is absent: not a fact we caption
    return {k: v for k, v in (("colour", colour), ("shape", shape)) if v}


def _easy_vqa_records(
    facts: dict[int, dict[str, str]], image_ids: list[int], split: str, max_captions: int
) -> list[CaptionedImage]:
    records, silent = [], 0
    for image_id in image_ids:
        known = facts.get(image_id, {})
        kind = "both" if len(known) == 2 else next(iter(known), None)
        if kind is None:
            silent += 1
            continue
        values = {"c": known.get("colour", ""), "s": known.get("shape", "")}
        values.update(a_c=_article(values["c"]), a_s=_article(values["s"]))
        captions = tuple(t.format(**values) for t in _TEMPLATES[kind][:max_captions])
        records.append(CaptionedImage(f"{split}/images/{image_id}.png", captions, split, f"{split}/{image_id}", True))
    if silent:
        log.info("easy-VQA %s: %d image(s) have no stated colour or shape and were left out", split, silent)
    return records


def _article(word: str) -> str:
    return "an" if word[:1] in ("a", "e", "i", "o", "u") else "a"
