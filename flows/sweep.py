"""A sweep: the pipeline mapped over datasets × seeds × aggregator variants (the paper's ablation).

Each cell is a sub-flow run of `aape-pipeline` writing to its own output folder; features,
prompts and backbones are shared through the content-keyed cache, so cells cost only training.
"""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from aape.config import load_params
from aape.evaluation.metrics import mean_std
from aape.preflight import preflight
from flows.pipeline import build_overrides, pipeline


def cell_output_dir(dataset: str, variant: str, seed: int) -> str:
    """Outside run.output_dir, which DVC owns: sweep cells are Prefect's, tracked in MLflow."""
    return str(Path("sweeps") / dataset / variant / f"seed{seed}")


def summarise(cells: list[dict[str, Any]]) -> str:
    """Markdown table: mean ± std over seeds of every metric, per dataset × variant; the std is the
    population std of the evaluation's own tables (aape.evaluation.metrics.mean_std)."""
    groups: dict[tuple[str, str], list[dict[str, float]]] = {}
    for cell in cells:
        groups.setdefault((cell["dataset"], cell["variant"]), []).append(cell["metrics"])
    names = sorted({k for c in cells for k, v in c["metrics"].items() if isinstance(v, (int, float))})
    lines = ["| dataset | aggregator | seeds | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
    for (dataset, variant), runs in sorted(groups.items()):
        row = []
        for name in names:
            stats = mean_std(r[name] for r in runs if isinstance(r.get(name), (int, float)))
            row.append(f"{stats.mean:.2f} ± {stats.std:.2f}" if stats.n else "")
        lines.append(f"| {dataset} | {variant} | {len(runs)} | " + " | ".join(row) + " |")
    return "\n".join(lines)


@flow(name="aape-sweep", log_prints=True)
def sweep(
    datasets: list[str],
    seeds: list[int] = [1, 2, 3],  # noqa: B006 (Prefect needs a literal default for its schema)
    variants: list[str] = ["attention"],  # noqa: B006
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    track: bool | None = None,
) -> list[dict[str, Any]]:
    logger = get_run_logger()
    for dataset in datasets or [None]:  # fail before the first cell on a bad config, of any cell
        preflight(load_params(params_file, build_overrides(overrides, dataset=dataset)), source=params_file)
    cells = []
    for dataset, variant, seed in product(datasets, variants, seeds):
        out = cell_output_dir(dataset, variant, seed)
        cell_overrides = [*(overrides or []), f"run.output_dir={out}", f"aggregator.variant={variant}"]
        logger.info("sweep cell: dataset=%s aggregator=%s seed=%d -> %s", dataset, variant, seed, out)
        pipeline.with_options(flow_run_name=f"{dataset}-{variant}-seed{seed}")(
            params_file=params_file,
            overrides=cell_overrides,
            dataset=dataset,
            seeds=[seed],
            track=track,
            register_model=False,
            record_in_dvc=False,
        )
        metrics = json.loads((Path(out) / "eval" / "metrics.json").read_text())
        cells.append({"dataset": dataset, "variant": variant, "seed": seed, "output_dir": out, "metrics": metrics})
    create_markdown_artifact(key="aape-sweep", markdown=summarise(cells), description="AAPE sweep results")
    return cells
