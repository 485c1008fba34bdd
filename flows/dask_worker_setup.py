"""Preloaded by every worker of a local Dask cluster when it starts (distributed's `preload`): the
libraries a cell needs are imported then, by all workers at once, instead of by each worker's first
cell in turn (about 20 s on a 2-core machine), and torch gets one thread per worker."""

from __future__ import annotations


def dask_setup(worker) -> None:  # distributed calls this once per worker
    import torch

    torch.set_num_threads(1)
    import aape.stages.distill_generator  # noqa: F401
    import aape.stages.evaluate  # noqa: F401
    import aape.stages.extract_features  # noqa: F401
    import aape.stages.generate_prompts  # noqa: F401
    import aape.stages.prepare_data  # noqa: F401
    import aape.stages.train_aggregator  # noqa: F401
    import aape.stages.train_baselines  # noqa: F401
    import matplotlib.figure  # noqa: F401 (the evaluation's figures)
    import open_clip  # noqa: F401 (extract-features loads a backbone in every cell; torchvision comes with it)
    import prefect.task_engine  # noqa: F401 (what runs each cell as a Prefect task: ~15 s on a cold worker)

    import flows.experiment  # noqa: F401


def dask_teardown(worker) -> None:  # distributed calls this when the worker closes
    # The worker process exits next, and its shutdown would search every object torch and the stages
    # created for cycles: closing a local cluster took 2.9-3.2 s with that, 0.5 s without (aape.allocator.exit_with).
    import gc

    gc.freeze()
