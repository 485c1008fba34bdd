"""`aape`: one command line for every stage.

    aape prepare-data | generate-prompts | extract-features | train-aggregator | distill-generator |
         train-baselines | evaluate
    aape methods        the methods evaluation.methods accepts: what each needs, trains and reports
    aape experiment     list | run FILE: experiment grids (experiments/*.yaml) on a Dask cluster
    aape run            all stages in order, in this process
    aape predict        classify images with a trained model and any class names
    aape config show    the validated configuration, defaults filled in
    aape config check   validate params.yaml and preflight it (exit 2 naming every problem)

Every command takes --params FILE and any number of --set key.path=value overrides.

An error of the library prints as `error: <message>` (and `hint: ...`) on stderr, with exit status
2 for a configuration error and 1 for any other; --log-level DEBUG prints its traceback first.
Unexpected exceptions (bugs) keep their traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from aape.config import Params, load_params
from aape.errors import report_errors
from aape.logs import setup_logging
from aape.preflight import preflight
from aape.stages import STAGES, stage_function
from aape.tracking import run_stage_tracked

log = logging.getLogger("aape.cli")

_params_option = click.option(
    "--params",
    "params_file",
    default="params.yaml",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Parameter file (the single source of settings).",
)
_set_option = click.option(
    "--set",
    "-s",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any key of params.yaml, e.g. -s data.shots=4 -s backbone.pretrained=random-init.",
)
_track_option = click.option(
    "--track/--no-track",
    default=None,
    help="Log to MLflow (default: tracking.enabled in params.yaml).",
)


def _load(params_file: str, overrides: tuple[str, ...]) -> Params:
    return load_params(params_file, list(overrides))


def _apply_runtime(params: Params) -> None:
    if params.run.num_threads:
        import torch

        torch.set_num_threads(params.run.num_threads)


def _tracker_context(params: Params, track: bool | None, what: str):
    from aape.integrations.mlflow_tracking import tracked_pipeline

    return tracked_pipeline(params, track, what, orchestrator=os.environ.get("AAPE_ORCHESTRATOR", "cli"))


def _run_stages(names: list[str], params: Params, track: bool | None) -> dict:
    summaries: dict[str, dict] = {}
    with _tracker_context(params, track, "+".join(names) if len(names) < 3 else "pipeline") as tracker:
        for name in names:
            summaries[name] = run_stage_tracked(name, stage_function(name), params, tracker)
    return summaries


def _stage_command(name: str) -> click.Command:
    module = STAGES[name]

    @click.command(name=name, help=f"Run the '{name}' stage (aape.stages.{module}).")
    @_params_option
    @_set_option
    @_track_option
    def command(params_file: str, overrides: tuple[str, ...], track: bool | None) -> None:
        params = _load(params_file, overrides)
        _apply_runtime(params)
        summary = _run_stages([name], params, track)[name]
        _echo_summary(name, summary)

    return command


def _echo_summary(name: str, summary: dict) -> None:
    outputs = summary.get("outputs", [])
    click.echo(f"[{name}] done" + (f" in {summary['seconds']:.1f}s" if "seconds" in summary else ""))
    for path in outputs:
        click.echo(f"  -> {Path(path).resolve()}")


class _OrderedGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context):
        # Around every command (and so every DVC stage, which runs `aape <stage>`); inside it the
        # group's callback has already applied --log-level, which decides on the traceback.
        with report_errors():
            return super().invoke(ctx)


@click.group(cls=_OrderedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default=os.environ.get("AAPE_LOG_LEVEL", "INFO"), show_default=True)
def main(log_level: str) -> None:
    """AAPE: Aggregate-and-Adapt Prompt Embedding for CLIP, stage by stage."""
    setup_logging(log_level.upper())


for _name in STAGES:
    main.add_command(_stage_command(_name))


@main.command("run")
@_params_option
@_set_option
@_track_option
@click.option("--from", "start", type=click.Choice(list(STAGES)), default=None, help="First stage to run.")
@click.option("--to", "stop", type=click.Choice(list(STAGES)), default=None, help="Last stage to run.")
def run_all(params_file: str, overrides: tuple[str, ...], track: bool | None, start: str | None, stop: str | None) -> None:
    """Run the stages in order in this process (no orchestrator)."""
    params = _load(params_file, overrides)
    names = list(STAGES)
    names = names[names.index(start) if start else 0 : (names.index(stop) + 1) if stop else None]
    if not names:
        raise click.ClickException("--from comes after --to: nothing to run")
    preflight(params, names, source=params_file)  # before a stage prepares data or pays for descriptions
    _apply_runtime(params)
    summaries = _run_stages(names, params, track)
    for name, summary in summaries.items():
        _echo_summary(name, summary)


@main.command("repro", context_settings={"ignore_unknown_options": True})
@_params_option
@_set_option
@_track_option
@click.argument("dvc_args", nargs=-1, type=click.UNPROCESSED)
def repro(params_file: str, overrides: tuple[str, ...], track: bool | None, dvc_args: tuple[str, ...]) -> None:
    """`dvc repro [DVC_ARGS]` under one MLflow parent run: every stage DVC starts joins it.

    Plain `dvc repro` runs each stage in its own process, and each opens its own parent run; here the
    parent is opened first and handed to them through AAPE_MLFLOW_PARENT_RUN_ID. The parent is
    FAILED when dvc fails, and this command exits with dvc's status.
    """
    params = _load(params_file, overrides)
    command = [sys.executable, "-m", "dvc", "repro", *dvc_args]
    with _tracker_context(params, track, "dvc repro") as tracker:
        env = dict(os.environ)
        if tracker is not None:
            env["AAPE_MLFLOW_PARENT_RUN_ID"] = tracker.run_id
            tracker.set_tags({"orchestrator": "dvc"})
        code = _run_command(command, env)
        if code and tracker is not None:
            raise SystemExit(code)  # inside the run: it is marked FAILED
    if code:
        raise SystemExit(code)


@main.command("plots", context_settings={"ignore_unknown_options": True})
@click.argument("action", type=click.Choice(["show", "diff"]))
@click.argument("dvc_args", nargs=-1, type=click.UNPROCESSED)
def plots(action: str, dvc_args: tuple[str, ...]) -> None:
    """`dvc plots show|diff [DVC_ARGS]` with a page that renders offline.

    DVC's page loads its chart libraries from a CDN, so without internet the curves are blank; this
    passes DVC a template with them inline (aape/integrations/dvc_plots.py). Output as DVC's:
    dvc_plots/index.html unless -o says otherwise.
    """
    import tempfile

    from aape.integrations.dvc_plots import write_offline_template

    with tempfile.TemporaryDirectory() as tmp:
        template = write_offline_template(Path(tmp) / "offline.html")
        code = _run_command([sys.executable, "-m", "dvc", "plots", action, "--html-template", str(template), *dvc_args], dict(os.environ))
    if code:
        raise SystemExit(code)


def _run_command(command: list[str], env: dict[str, str]) -> int:
    import subprocess

    return subprocess.run(command, env=env).returncode


@main.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False), help="A generator/seed{S} directory.")
@click.option("--classes", required=True, help="Class names: comma-separated, or a file with one per line.")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--output", "output_csv", type=click.Path(dir_okay=False), default=None, help="Write a CSV instead of printing.")
@_params_option
@_set_option
def predict(images, model_dir, classes, top_k, output_csv, params_file, overrides) -> None:
    """Classify image files or folders with a trained AAPE model and any class names."""
    from aape.evaluation.predict import predict_paths, read_class_names, write_or_print

    params = _load(params_file, overrides)
    _apply_runtime(params)
    names = read_class_names(classes)
    predictions = predict_paths([Path(p) for p in images], Path(model_dir), names, params, top_k=top_k)
    write_or_print(predictions, output_csv)


@main.group("experiment")
def experiment_group() -> None:
    """Experiment grids (experiments/*.yaml) fanned out on a Dask cluster."""


@experiment_group.command("list")
@click.option("--folder", default="experiments", show_default=True, type=click.Path(file_okay=False))
def experiment_list(folder: str) -> None:
    """The experiment files and what each reproduces."""
    from aape.experiments import load_experiment

    for path in sorted(Path(folder).glob("*.yaml")):
        with report_errors():
            spec = load_experiment(path)
        cells = len(spec.seeds)
        for values in spec.grid.values():
            cells *= len(values)
        click.echo(f"{str(path):<40} {spec.paper or '-':<12} {cells:>4} cells  {spec.description}")


@experiment_group.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--params", "params_file", default="params.yaml", show_default=True)
@click.option("--set", "-s", "overrides", multiple=True, help="key.path=value for every cell")
@click.option("--workers", default=2, show_default=True, help="workers of the local Dask cluster (one cell each)")
@click.option("--address", default=None, help="an existing Dask scheduler, e.g. tcp://host:8786")
@click.option("--gpus-per-cell", default=0, show_default=True)
def experiment_run(file: str, params_file: str, overrides: tuple[str, ...], workers: int, address: str | None, gpus_per_cell: int) -> None:
    """Run FILE's grid through the `aape-experiment` Prefect flow on Dask (flows/experiment.py)."""
    from aape.experiments import cells, load_experiment

    with report_errors():  # a bad file or value stops here, before a cluster starts
        spec = load_experiment(file)
        cells(spec, params_file, "experiments", list(overrides))
    command = [sys.executable, "-m", "flows.experiment", file, "--params", params_file, "--workers", str(workers),
               "--gpus-per-cell", str(gpus_per_cell), *(["--address", address] if address else []),
               *(arg for o in overrides for arg in ("--set", o))]
    env = dict(os.environ)
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a busy machine starts Prefect's ephemeral API slowly
    raise SystemExit(_run_command(command, env))


@main.command("methods")
def methods() -> None:
    """List the methods of the registry (aape/methods/registry.py)."""
    from aape.methods.registry import METHODS, REFERENCE_SETTING

    setting = ", ".join(f"{k} {v}" for k, v in REFERENCE_SETTING.items())
    click.echo(f"{'method':<18} {'trained by':<18} {'text encoder':<13} {'unseen classes':<15} published B / N / H ({setting})")
    for name, spec in METHODS.items():
        reference = f"{spec.reference.base} / {spec.reference.new} / {spec.reference.H} ({spec.reference.source})" if spec.reference else "-"
        click.echo(f"{name:<18} {spec.trainer:<18} {'yes' if spec.text_encoder else 'no':<13} "
                   f"{'yes' if spec.scores_unseen else 'no':<15} {reference}")
        click.echo(f"{'':<18} {spec.title}" + (f"; unseen: {spec.unseen}" if spec.unseen else ""))


@main.group("config")
def config_group() -> None:
    """Inspect and validate the configuration."""


@config_group.command("show")
@_params_option
@_set_option
@click.option("--json", "as_json", is_flag=True, help="Print flattened JSON instead of YAML.")
def config_show(params_file: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Print the validated configuration with every default filled in."""
    import yaml

    params = _load(params_file, overrides)
    if as_json:
        click.echo(json.dumps(params.flat(), indent=2))
    else:
        click.echo(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))


@config_group.command("check")
@_params_option
@_set_option
def config_check(params_file: str, overrides: tuple[str, ...]) -> None:
    """Validate params.yaml and check what it names exists; exit 2 naming every problem."""
    params = _load(params_file, overrides)
    preflight(params, source=params_file)
    click.echo(f"{params_file}: valid (run '{params.run.name}', dataset '{params.data.dataset}', backbone {params.backbone.model}/{params.backbone.pretrained})")


def entry() -> None:
    """The `aape` console script: the command group, exiting without shutdown's garbage collection."""
    from aape.allocator import exit_with

    exit_with(main)


if __name__ == "__main__":  # pragma: no cover
    entry()
