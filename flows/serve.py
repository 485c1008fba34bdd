"""Serve the pipeline and sweep deployments from this process (no work pool needed).

    python -m flows.serve        # then, from another shell:
    prefect deployment run 'aape-pipeline/local' --watch

For a team's work pools, see prefect.yaml (`prefect deploy --all`).
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "aape")

from prefect import serve  # noqa: E402

from flows.pipeline import pipeline  # noqa: E402
from flows.experiment import experiment  # noqa: E402
from flows.sweep import sweep  # noqa: E402


def main() -> None:
    serve(
        pipeline.to_deployment(name="local", description="AAPE pipeline with params.yaml (override any key)"),
        sweep.to_deployment(name="local", parameters={"datasets": ["demo-mnist"]}, description="datasets × seeds × aggregator variants"),
        experiment.to_deployment(name="local", parameters={"file": "experiments/demo-lambda.yaml"},
                                 description="an experiment file's grid on a local Dask cluster (AAPE_DASK_ADDRESS: an existing one)"),
    )


if __name__ == "__main__":
    main()
