"""descriptions.parquet: its one schema (shared by every source), atomic writing and reading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from aape.atomic import atomic_write_stream
from aape.prompts.errors import PromptsError

# The contract of docs/architecture.md, in order. Nullable fields are null where a source has no
# such value (an imported file has no temperature, request or token counts).
DESCRIPTION_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("class_index", pa.int64(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("template", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("raw_text", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("temperature", pa.float64()),
        pa.field("sample_index", pa.int64(), nullable=False),
        pa.field("request_id", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
DESCRIPTION_COLUMNS: tuple[str, ...] = tuple(DESCRIPTION_SCHEMA.names)


def write_descriptions(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows (dicts with exactly DESCRIPTION_COLUMNS) -> Parquet with DESCRIPTION_SCHEMA, atomically."""
    table = pa.Table.from_pylist(rows, schema=DESCRIPTION_SCHEMA)
    atomic_write_stream(path, lambda handle: pq.write_table(table, handle))


def load_descriptions(path: str | Path) -> pd.DataFrame:
    """Read descriptions.parquet, checking it carries the contract's columns."""
    path = Path(path)
    if not path.is_file():
        raise PromptsError(f"descriptions file {path} not found; run `aape generate-prompts` first")
    try:
        frame = pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowInvalid) as exc:
        raise PromptsError(f"cannot read descriptions file {path}: {exc}. Delete it and rerun `aape generate-prompts`") from None
    missing = [c for c in DESCRIPTION_COLUMNS if c not in frame.columns]
    if missing:
        raise PromptsError(f"{path} lacks the columns {missing}; it was not written by this version: rerun `aape generate-prompts`")
    return frame


def descriptions_by_class(frame_or_path: pd.DataFrame | str | Path, num_classes: int | None = None) -> dict[int, list[str]]:
    """{class_index: [texts]} in file order. With num_classes, every index 0..num_classes-1 must have texts."""
    frame = frame_or_path if isinstance(frame_or_path, pd.DataFrame) else load_descriptions(frame_or_path)
    grouped: dict[int, list[str]] = {}
    for index, text in zip(frame["class_index"].tolist(), frame["text"].tolist()):
        grouped.setdefault(int(index), []).append(text)
    if num_classes is not None:
        missing = [i for i in range(num_classes) if not grouped.get(i)]
        if missing:
            raise PromptsError(
                f"no descriptions for class indices {missing[:20]} (of {num_classes} classes); "
                "the descriptions were made for another class list: rerun `aape generate-prompts`"
            )
    return grouped
