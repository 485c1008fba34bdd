"""Experiments as data: a YAML file names a grid of params.yaml overrides, the seeds, the methods and
the table to build; this module validates it, expands it into cells and turns finished cells into
the paper-layout table. Running the cells is the orchestrator's (flows/experiment.py, on Dask).

    name: table6-lambda                     # also the folder: experiments/<name>/ under run.output_dir's parent
    paper: "Table 6"                        # what it reproduces
    description: ...
    overrides: [data.protocol=base2new]     # applied to every cell
    grid: {generator.lambda_distill: [3, 5, 7, 9]}   # the cartesian product of these keys
    seeds: [1, 2, 3]
    methods: [zeroshot, aape]               # evaluation.methods of every cell
    table: {rows: generator.lambda_distill, columns: data.dataset, metric: H}

One cell = one grid point and one seed, in its own output folder; `cell.json` there records the
cell's settings and a digest of its resolved configuration, so a rerun skips finished cells and
redoes a cell whose settings changed. Work shared by cells (the data, the descriptions, the image
and text features) is keyed by content in run.cache_dir, so it is computed once (`shared_work`
lists one cell per distinct data setting, to run first) and every other cell finds it cached.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aape.config import ConfigError, Params, flatten, load_params
from aape.evaluation.metrics import mean_std

CELL_FILE = "cell.json"
# settings that change what the first three stages compute: cells that agree on them share that work
SHARED_PREFIXES = ("data.", "prompts.", "backbone.", "features.", "run.cache_dir", "run.task")
METHOD_AXIS = "method"


class TableSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: str = Field(METHOD_AXIS, description="'method' or a grid key")
    columns: str | None = Field(None, description="a grid key, or none (one column)")
    metric: str | None = Field(None, description="H / base_accuracy / new_accuracy / accuracy; default by protocol")


class ExperimentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    paper: str = ""
    description: str = ""
    overrides: list[str] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3], min_length=1)
    methods: list[str] | None = None
    table: TableSpec = Field(default_factory=TableSpec)

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [k for k, values in v.items() if not values]
        if empty:
            raise ValueError(f"grid key(s) {empty} have no values")
        return v


@dataclass(frozen=True)
class Cell:
    point: tuple[tuple[str, Any], ...]  # (grid key, value) in the file's key order
    seed: int
    overrides: tuple[str, ...]  # everything that makes this cell's params.yaml
    output_dir: str

    @property
    def key(self) -> str:
        values = "_".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.point) or "base"
        return f"{values}/seed{self.seed}"

    def settings(self) -> dict[str, Any]:
        return {**dict(self.point), "seed": self.seed}


def load_experiment(path: str | Path) -> ExperimentSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} not found; the shipped ones are in experiments/ (`aape experiment list`)")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    try:
        spec = ExperimentSpec.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid experiment file {path}: {problems}") from None
    for axis in (spec.table.rows, spec.table.columns):
        if axis not in (None, METHOD_AXIS) and axis not in spec.grid:
            raise ConfigError(f"{path}: table axis {axis!r} is neither 'method' nor a grid key ({', '.join(spec.grid) or 'none'})")
    return spec


def cells(spec: ExperimentSpec, params_file: str | Path | None, root: str | Path, extra: list[str] | None = None) -> list[Cell]:
    """Every grid point x seed, each validated now (a bad value fails before any cell runs)."""
    keys = list(spec.grid)
    built = []
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        point = tuple(zip(keys, values))
        for seed in spec.seeds:
            name = "_".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point) or "base"
            out = str(Path(root) / spec.name / _safe(name) / f"seed{seed}")
            # later overrides win: the file's, then the caller's, then what makes this cell this cell
            overrides = [*spec.overrides, *(extra or []), *(f"{k}={_yaml(v)}" for k, v in point), f"run.seeds=[{seed}]",
                         f"run.output_dir={out}", *([f"evaluation.methods=[{', '.join(spec.methods)}]"] if spec.methods else [])]
            load_params(params_file, overrides)  # raises ConfigError naming the key
            built.append(Cell(point, seed, tuple(overrides), out))
    return built


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "=._-" else "_" for c in text)


def _yaml(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def cell_params(cell: Cell, params_file: str | Path | None) -> Params:
    return load_params(params_file, list(cell.overrides))


def digest(params: Params) -> str:
    return hashlib.sha256(json.dumps(params.flat(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_finished(cell: Cell, params: Params) -> bool:
    """The cell's metrics exist and were computed with exactly these settings."""
    record = Path(cell.output_dir) / CELL_FILE
    if not record.is_file() or not (Path(cell.output_dir) / "eval" / "metrics.json").is_file():
        return False
    try:
        return json.loads(record.read_text()).get("digest") == digest(params)
    except json.JSONDecodeError:
        return False


def mark_finished(cell: Cell, params: Params, seconds: float) -> None:
    from aape.atomic import atomic_write_json

    atomic_write_json(Path(cell.output_dir) / CELL_FILE, {"settings": cell.settings(), "digest": digest(params), "seconds": seconds,
                                                          "overrides": list(cell.overrides)})


def shared_work(all_cells: list[Cell], params_file: str | Path | None) -> list[Cell]:
    """One cell per distinct setting of what prepare-data, generate-prompts and extract-features compute."""
    chosen: dict[str, Cell] = {}
    for cell in all_cells:
        flat = flatten(cell_params(cell, params_file).model_dump(mode="json"))
        key = json.dumps({k: v for k, v in sorted(flat.items()) if k.startswith(SHARED_PREFIXES) and k != "run.seeds"}, default=str)
        chosen.setdefault(key, cell)
    return list(chosen.values())


# results ---------------------------------------------------------------------------------------


def cell_metrics(cell: Cell) -> dict[str, Any]:
    return json.loads((Path(cell.output_dir) / "eval" / "metrics.json").read_text())


def _metric_of(metrics: dict[str, Any], method: str, metric: str | None) -> tuple[str, float | None]:
    """(metric name, value) of `method` in one cell's metrics.json, on the training dataset's protocol."""
    for name in ([metric] if metric else ["H", "accuracy"]):
        for key, value in metrics.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[1] == method and parts[2] == f"{name}_mean" and isinstance(value, (int, float)):
                return name, float(value)
    return metric or "H", None


def table(spec: ExperimentSpec, finished: list[tuple[Cell, dict[str, Any]]], methods: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """The paper-layout markdown table(s) (mean ± population std over seeds) and their long-form rows.
    When neither axis is 'method', a table without columns gets one column per method, and a table
    with a grid key on both axes is drawn once per method."""
    records: list[dict[str, Any]] = []
    for cell, metrics in finished:
        point = dict(cell.point)
        for method in methods:
            name, value = _metric_of(metrics, method, spec.table.metric)
            if value is not None:
                records.append({**{k: str(v) for k, v in point.items()}, METHOD_AXIS: method, "seed": cell.seed, "metric": name,
                                "value": value, "random_init": bool(metrics.get("random_init"))})
    rows_axis, cols_axis = spec.table.rows, spec.table.columns
    if METHOD_AXIS in (rows_axis, cols_axis):
        return _grid_table(spec, records, methods, rows_axis, cols_axis), records
    if cols_axis is None:
        return _grid_table(spec, records, methods, rows_axis, METHOD_AXIS), records
    parts = [f"### {m}\n\n" + _grid_table(spec, [r for r in records if r[METHOD_AXIS] == m], methods, rows_axis, cols_axis)
             for m in methods if any(r[METHOD_AXIS] == m for r in records)]
    return "\n\n".join(parts), records


def _grid_table(spec: ExperimentSpec, records: list[dict[str, Any]], methods: list[str], rows_axis: str, cols_axis: str | None) -> str:
    metric = records[0]["metric"] if records else (spec.table.metric or "H")
    row_values = _ordered(records, rows_axis, spec, methods)
    col_values = _ordered(records, cols_axis, spec, methods) if cols_axis else [None]
    header = [rows_axis] + [f"{c} ({metric})" if c is not None else metric for c in col_values]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in row_values:
        values = [[x["value"] for x in records if x[rows_axis] == r and (c is None or x[cols_axis] == c)] for c in col_values]
        lines.append(f"| {r} | " + " | ".join(_mean_std(v) for v in values) + " |")
    return "\n".join(lines)


def _ordered(records: list[dict[str, Any]], axis: str, spec: ExperimentSpec, methods: list[str]) -> list[str]:
    if axis == METHOD_AXIS:
        return [m for m in methods if any(r[METHOD_AXIS] == m for r in records)]
    return [str(v) for v in spec.grid[axis] if any(r[axis] == str(v) for r in records)]


def _mean_std(values: list[float]) -> str:
    stats = mean_std(values)  # population std, as every table of the project
    return "n/a" if not stats.n else f"{stats.mean:.2f} ± {stats.std:.2f} (n={stats.n})"
