"""Parquet manifests (path, label, classname) and classes.json: what prepare-data writes, others read.

Each manifest carries its provenance in the Parquet schema metadata under the key "aape": the
dataset, the sha256 of the source split's content, and for draws the seed and shot count.

classes.json has one typed reader and writer, `ClassesManifest`: prepare-data writes it with
`ClassesManifest.write`, every later stage reads it with `ClassesManifest.read` (generate-prompts,
which needs only the names, with `ClassNames.read`), and the one error, `ClassesManifestError`,
names the file and says to rerun prepare-data.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from aape.atomic import atomic_write, atomic_write_json
from aape.data.images import DataError
from aape.data.records import Record

if TYPE_CHECKING:
    from aape.config import ScheduleConfig

SCHEMA = pa.schema([("path", pa.string()), ("label", pa.int64()), ("classname", pa.string())])
METADATA_KEY = b"aape"


def write_manifest(records: Sequence[Record], path: Path, metadata: dict[str, Any] | None = None) -> Path:
    """Atomically write records as Parquet (columns path, label, classname) with JSON metadata."""
    table = pa.table(
        {
            "path": [r.path for r in records],
            "label": [r.label for r in records],
            "classname": [r.classname for r in records],
        },
        schema=SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata or {}, sort_keys=True).encode()}),
    )
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_manifest(path: Path):
    """The manifest as a pandas DataFrame (row order is the order features are stored in)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist; run `aape prepare-data` first")
    return pq.read_table(path).to_pandas()


def manifest_metadata(path: Path) -> dict[str, Any]:
    raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}



# classes.json ----------------------------------------------------------------------------------

RERUN = "rerun `aape prepare-data` (it writes data/classes.json)"
PROTOCOLS = ("base2new", "fewshot")

M = TypeVar("M", bound="ClassNames")


class ClassesManifestError(DataError):
    """data/classes.json is missing or malformed; the message names the file and says to rerun prepare-data."""


class _Invalid(Exception):
    """A value of the wrong shape; the manifest turns it into a ClassesManifestError naming file and key."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("must be a non-empty string")
    return value


def _texts(value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise _Invalid("must be a non-empty list of non-empty strings")
    return list(value)


def _notes(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid("must be a list of strings")
    return list(value)


def _count(value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise _Invalid("must be an integer >= 1")
    return int(value)


def _tally(value: Any) -> int:
    if not _is_int(value) or value < 0:
        raise _Invalid("must be an integer >= 0")
    return int(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("must be true or false")
    return value


def _labels(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise _Invalid("must be a list of integer labels")
    return [int(v) for v in value]


def _label_sets(value: Any) -> dict[str, list[int]]:
    if not isinstance(value, dict) or not value or not all(isinstance(v, list) and all(map(_is_int, v)) for v in value.values()):
        raise _Invalid("must map each eval set's name to a list of integer labels")
    return {str(k): [int(c) for c in v] for k, v in value.items()}


def _protocol(value: Any) -> str:
    if value not in PROTOCOLS:
        raise _Invalid(f"must be one of {', '.join(PROTOCOLS)}")
    return value


def _or_none(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


def _key(check: Callable[[Any], Any], **kwargs: Any) -> Any:
    """A dataclass field that is a key of classes.json, checked (and normalised) by `check`."""
    return field(metadata={"check": check}, **kwargs)


def _load_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ClassesManifestError(f"{path} does not exist; run `aape prepare-data` first (it writes data/classes.json)")
    try:
        tree = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClassesManifestError(f"{path} is not valid JSON ({exc}); {RERUN}") from None
    if not isinstance(tree, dict):
        raise ClassesManifestError(f"{path} must hold a JSON object; {RERUN}")
    return tree


def _required_keys(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if "check" in f.metadata and f.default is MISSING and f.default_factory is MISSING]


@dataclass(frozen=True)
class ClassNames:
    """The dataset key and every class's name: all that generate-prompts needs of classes.json.

    Every key is checked (and lists copied) on construction, so an instance is always valid;
    `path` is the file it was read from (None when built in memory)."""

    dataset: str = _key(_text)  # the canonical key prepare-data records ("imagenet" for "ImageNet-1k")
    classnames: list[str] = _key(_texts)  # indexed by global label
    path: Path | None = field(default=None, compare=False, repr=False, kw_only=True)

    def __post_init__(self) -> None:
        for f in fields(self):
            check = f.metadata.get("check")
            if check is None:
                continue
            value = getattr(self, f.name)
            try:
                object.__setattr__(self, f.name, check(value))
            except _Invalid as exc:
                raise ClassesManifestError(f"{self._where}: key '{f.name}' {exc} (found {_sample(value)}); {RERUN}") from None

    @property
    def _where(self) -> str:
        return str(self.path) if self.path is not None else "classes.json (in memory)"

    @classmethod
    def read(cls: type[M], path: Path | str) -> M:
        """The file as this type; ClassesManifestError (naming the file) when it is missing or malformed."""
        path = Path(path)
        tree = _load_object(path)
        missing = [key for key in _required_keys(cls) if key not in tree]
        if missing:
            raise ClassesManifestError(f"{path} lacks the key(s) {', '.join(missing)}; {RERUN}")
        keys = [f.name for f in fields(cls) if "check" in f.metadata and f.name in tree]
        return cls(**{key: tree[key] for key in keys}, path=path)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@dataclass(frozen=True)
class ClassesManifest(ClassNames):
    """data/classes.json, the contract between prepare-data and every later stage (docs/architecture.md).

    Labels are global (the dataset's own 0-based label); `train_classes` is the local order every
    model of the run uses. The keys after `shots` are additions beyond the contract's minimum."""

    image_root: str = _key(_text)  # as configured: relative paths stay relative
    protocol: str = _key(_protocol)  # base2new | fewshot
    train_classes: list[int] = _key(_labels)  # the classes models train on (base, or all with fewshot)
    eval_sets: dict[str, list[int]] = _key(_label_sets)  # {"base": [...], "new": [...]} or {"all": [...]}
    split_hash: str = _key(_text)  # sha256 of the source split's content
    seeds: list[int] = _key(_labels)  # the seeds whose few-shot draws exist
    shots: int = _key(_count)  # K training images per class of each draw (data.shots when prepared)
    val_shots: int | None = _key(_or_none(_count), default=None)
    test_per_class: int | None = _key(_or_none(_count), default=None)
    split_source: str | None = _key(_or_none(_text), default=None)
    official_split: bool | None = _key(_or_none(_flag), default=None)
    notes: list[str] = _key(_notes, default_factory=list)
    skipped_images: int = _key(_tally, default=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_classes
        if not self.train_classes:
            raise ClassesManifestError(f"{self._where}: key 'train_classes' is empty; {RERUN}")
        named = {"train_classes": self.train_classes, **{f"eval_sets.{k}": v for k, v in self.eval_sets.items()}}
        for key, labels in named.items():
            bad = [c for c in labels if not 0 <= c < n]
            if bad:
                raise ClassesManifestError(f"{self._where}: key '{key}' holds labels {bad[:5]} outside the {n} classes; {RERUN}")

    @property
    def train_classnames(self) -> list[str]:
        return [self.classnames[c] for c in self.train_classes]

    def epochs(self, schedule: ScheduleConfig) -> int:
        """CoOp's epoch count for the shots and dataset this data was prepared with, not params.data's
        (which may be an alias, or changed since)."""
        return schedule.resolved_epochs(self.shots, self.dataset)

    def to_json(self) -> dict[str, Any]:
        """The file's content in the documented key order; num_classes is derived, for human readers."""
        return {
            "dataset": self.dataset,
            "image_root": self.image_root,
            "classnames": self.classnames,
            "protocol": self.protocol,
            "train_classes": self.train_classes,
            "eval_sets": self.eval_sets,
            "split_hash": self.split_hash,
            "seeds": self.seeds,
            "shots": self.shots,
            # additions beyond the contract's minimum
            "val_shots": self.val_shots,
            "test_per_class": self.test_per_class,
            "num_classes": self.num_classes,
            "split_source": self.split_source,
            "official_split": self.official_split,
            "notes": self.notes,
            "skipped_images": self.skipped_images,
        }

    def write(self, path: Path | str) -> Path:
        """Atomically write the manifest to `path` (data/classes.json); returns the path."""
        return atomic_write_json(path, self.to_json())


def _sample(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
