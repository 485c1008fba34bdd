"""Parquet manifests (path, label, classname) and classes.json: what prepare-data writes, others read.

Each manifest carries its provenance in the Parquet schema metadata under the key "aape": the
dataset, the sha256 of the source split's content, and for draws the seed and shot count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from aape.atomic import atomic_write
from aape.data.images import DataError
from aape.data.records import Record

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


def read_classes(path: Path, required: Sequence[str] = ("dataset", "classnames")) -> dict[str, Any]:
    """classes.json as a dict, with the `required` keys present: the one reader every stage uses.
    Errors name the file and say to (re)run prepare-data."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; run `aape prepare-data` first (it writes data/classes.json)")
    try:
        tree = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); rerun `aape prepare-data`") from None
    if not isinstance(tree, dict):
        raise DataError(f"{path} must hold a JSON object; rerun `aape prepare-data`")
    missing = [key for key in required if key not in tree]
    if missing:
        raise DataError(f"{path} lacks the key(s) {', '.join(missing)}; rerun `aape prepare-data`")
    return tree
