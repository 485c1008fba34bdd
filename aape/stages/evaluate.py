"""Stage `evaluate`: every method of evaluation.methods under the run's protocol (and the transfer
protocols configured), for every seed; tables, metrics.json, figures and report.md in eval/.

Each method × seed is logged to a nested tracker run named "<method>/seed<S>" (transfer targets:
"<scope>:<dataset>/<method>/seed<S>") with the same metric names for every method, so MLflow's
compare view lines them up; metrics.json holds the same figures flattened for DVC.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from aape.backbone import RANDOM_INIT_NOTICE
from aape.config import VL_TASKS, Params
from aape.data.manifests import ClassesManifest
from aape.evaluation.classifiers import CSearch, EvaluationError, LinearProbe
from aape.evaluation.outputs import (
    attention_figure,
    confusion_figures,
    per_class_figures,
    shots_curve,
    shots_result_files,
    write_parquet,
)
from aape.evaluation.plots import accuracy_vs_shots, stamp_notice
from aape.evaluation.protocols import TransferTarget, build_classifiers, evaluate_seed, model_dir
from aape.evaluation.report import ReportContext, render_report
from aape.evaluation.metrics import MeanStd
from aape.evaluation.results import (
    BASE2NEW,
    SetOutcome,
    flat_metrics,
    notes_by_method,
    per_class_frame,
    results_frame,
    seed_metrics,
    summarise,
)
from aape.evaluation.transfer import load_transfer_targets
from aape.features import FeatureBundle, load_bundle
from aape.features.baseline_templates import baseline_templates
from aape.atomic import atomic_write_json, atomic_write_text
from aape.layout import Layout
from aape.logs import progress, stage
from aape.methods.artifact import is_trained
from aape.methods.context import backbone_loader
from aape.methods.registry import DISTILL_GENERATOR, TRAIN_BASELINES, method_names, method_spec
from aape.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

NAME = "evaluate"


@dataclass
class Evaluation:
    """One evaluation: what every seed is scored with, and what the seeds gave (outcomes, probes)."""

    params: Params
    layout: Layout
    info: ClassesManifest  # data/classes.json: dataset, protocol, eval sets, shots
    methods: list[str]
    first: FeatureBundle  # the first seed's features: the backbone, the baselines' templates
    targets: list[TransferTarget]
    extra_results: list[Path]  # evaluation.shots_results: other runs' results.parquet for the shots curve
    outcomes: list[SetOutcome] = field(default_factory=list)
    probes: dict[int, LinearProbe] = field(default_factory=dict)  # each seed's linear probe, when one was trained
    load_backbone: Any = None  # () -> the backbone, loaded once, by the first method that runs the text encoder

    def __post_init__(self) -> None:
        self.load_backbone = self.load_backbone or backbone_loader(self.params)


@dataclass
class Tables:
    """What the figures and the report are made from."""

    results: pd.DataFrame  # one row per method x seed x set
    per_class: pd.DataFrame
    summary: dict[tuple[str, str, str], dict[str, MeanStd]]  # (scope, dataset, method) -> metric -> mean ± std
    metrics: dict[str, Any]  # metrics.json


def run(params: Params, tracker: Tracker | None = None) -> dict[str, Any]:
    tracker = tracker or NullTracker()
    layout = Layout.from_params(params)
    if params.run.task == "retrieval":
        from aape.retrieval import pipeline as retrieval

        with stage(NAME) as summary:
            retrieval.evaluate(params, summary, tracker)
        return summary
    if params.run.task in VL_TASKS:
        from aape.vl import pipeline as vl

        with stage(NAME) as summary:
            vl.evaluate(params, summary, tracker)
        return summary
    with stage(NAME) as summary:
        ev = _prepare(params, layout)
        for seed in progress(params.run.seeds, desc="evaluate seeds", unit="seed"):
            _evaluate_seed(ev, seed, tracker)
        written = _write_outputs(ev)
        summary["outputs"].extend(str(p) for p in written["files"])
        _log_run(tracker, ev, written)
        metrics, first, info = written["metrics"], ev.first, ev.info
        headline = {k: v for k, v in metrics.items() if k.startswith(f"{info.protocol}/aape/") and k.endswith("_mean")}
        summary.update(headline=headline, random_init=first.random_init, report=str(layout.eval / "report.md"))
        for key, value in headline.items():
            log.info("%s = %.2f%s", key, value, " [RANDOM-INIT backbone]" if first.random_init else "")
    return summary


def _prepare(params: Params, layout: Layout) -> Evaluation:
    """Read and check everything that can be missing before any work, so nothing done is thrown away."""
    info = ClassesManifest.read(layout.classes_file)
    methods = list(params.evaluation.methods)
    if not methods:
        raise EvaluationError(f"evaluation.methods is empty; list at least one of: {', '.join(method_names())}")
    extra_results = shots_result_files(params.evaluation.shots_results)
    _check_models_exist(layout, methods, params.run.seeds)
    first = load_bundle(layout, params.run.seeds[0])
    _check_bundle(first, info)
    _check_baseline_templates(first, params, methods)
    if first.random_init:
        log.warning("%s: every figure of this evaluation is meaningless about CLIP and AAPE", RANDOM_INIT_NOTICE)
    targets = load_transfer_targets(params, layout, info, first)
    return Evaluation(params, layout, info, methods, first, targets, extra_results)


def _evaluate_seed(ev: Evaluation, seed: int, tracker: Tracker) -> None:
    """Every method of one seed on every set; outcomes and the seed's probe are added to `ev`."""
    bundle = ev.first if seed == ev.first.seed else load_bundle(ev.layout, seed)
    _check_bundle(bundle, ev.info)
    classifiers = build_classifiers(ev.methods, bundle, ev.info, ev.layout, ev.params, ev.load_backbone)
    if isinstance(classifiers.get("linear-probe"), LinearProbe):
        ev.probes[seed] = classifiers["linear-probe"]  # type: ignore[assignment]
    seed_outcomes = evaluate_seed(classifiers, bundle, ev.info, ev.targets, ev.params.evaluation.batch_size)
    _log_children(tracker, seed_outcomes, ev.info, bundle, ev.params, _baseline_tags(bundle, ev.probes.get(seed)))
    ev.outcomes.extend(seed_outcomes)


def _log_run(tracker: Tracker, ev: Evaluation, written: dict[str, Any]) -> None:
    tracker.set_tags({"random_init": str(ev.first.random_init).lower(), "backbone": ev.first.identity})
    tracker.log_metrics({k: v for k, v in written["metrics"].items() if isinstance(v, float)})
    _log_method_means(tracker, ev, written["summary"])
    for path in written["artifacts"]:  # a folder's files land under eval/<folder>/
        tracker.log_artifact(path, f"eval/{path.name}" if path.is_dir() else "eval")


def _log_method_means(tracker: Tracker, ev: Evaluation, summary: dict[tuple[str, str, str], dict[str, MeanStd]]) -> None:
    """One run per method (and transfer target) over all seeds: `<metric>` is the mean, `<metric>_std`
    the std, so "AAPE against CoOp" is two rows of the runs table, each with its headline columns."""
    seeds = ",".join(str(s) for s in ev.params.run.seeds)
    for (scope, dataset, method), metrics in summary.items():
        tags = {**_method_tags(scope, dataset, method, ev.info, ev.first.random_init), "aggregate": "mean over seeds"}
        n = max((m.n for m in metrics.values()), default=0)
        with tracker.peer(_child_name(scope, dataset, method, ev.info, f"mean of {n} seeds"), tags=tags) as child:
            child.log_params({**method_params(method, ev.params, ev.info), "seed": f"mean of {seeds}"})
            values = {}
            for name, value in metrics.items():
                if value.n:  # metrics a method cannot have (the probe's new-class accuracy) are left out
                    values[name] = value.mean
                    values[f"{name}_std"] = value.std
            child.log_metrics(values)


def _check_models_exist(layout: Layout, methods: list[str], seeds: list[int]) -> None:
    """Every trained method's weights for every seed, before any work (the registry says which stage trains it)."""
    for method in methods:
        spec = method_spec(method)
        for seed in seeds:
            if spec.trainer == DISTILL_GENERATOR:
                directory = model_dir(layout, method, seed)
                present = (directory / "generator.json").is_file()
            elif spec.trainer == TRAIN_BASELINES:
                directory = layout.baseline_dir(method, seed)
                present = is_trained(directory)
            else:
                continue
            if not present:
                raise EvaluationError(
                    f"no trained model for method '{method}', seed {seed}: {directory} is missing. Run "
                    f"`aape {spec.trainer}` (with this run.seeds and evaluation.methods), or remove '{method}' "
                    f"from evaluation.methods."
                )


def _check_bundle(bundle: FeatureBundle, info: ClassesManifest) -> None:
    if bundle.class_prompts.shape[0] != len(info.classnames):
        raise EvaluationError(
            f"the features hold {bundle.class_prompts.shape[0]} class prompts but {info.path} lists "
            f"{len(info.classnames)} classes: the features are stale. Re-run `aape extract-features`."
        )


def _check_baseline_templates(bundle: FeatureBundle, params: Params, methods: list[str]) -> None:
    """The zero-shot baselines' features must be those of the templates params.yaml asks for now."""
    if not {"zeroshot", "zeroshot-ensemble"} & set(methods):
        return
    bundle.zeroshot_prompts  # noqa: B018 (raises, saying to re-extract, for text files of older versions)
    wanted = baseline_templates(params.features, params.data.dataset).metadata()
    for key, setting in (("zeroshot_template", "features.zeroshot_template"), ("ensemble_templates", "features.ensemble_templates")):
        recorded = bundle.text_meta.get(key)
        if recorded is not None and recorded != wanted[key]:
            raise EvaluationError(
                f"features/text.safetensors holds the baselines' {key} {_short(recorded)}, but {setting} with "
                f"data.dataset={params.data.dataset!r} gives {_short(wanted[key])}: the features are stale. "
                f"Re-run `aape extract-features`."
            )


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 3:
        return f"[{', '.join(map(repr, value[:3]))}, ... ({len(value)} templates)]"
    return repr(value)


def _baseline_metrics(bundle: FeatureBundle, methods: list[str], probes: dict[int, LinearProbe]) -> dict[str, Any]:
    """metrics.json's record of how the baselines were built: the templates and each seed's probe C."""
    meta, recorded = bundle.text_meta, {}
    if "zeroshot" in methods:
        recorded["baselines/zeroshot/template"] = meta.get("zeroshot_template")
    if "zeroshot-ensemble" in methods:
        recorded["baselines/zeroshot-ensemble/templates"] = meta.get("ensemble_templates_source")
    for seed, probe in probes.items():
        recorded[f"baselines/linear-probe/seed{seed}/C"] = float(probe.regularisation_c)
        recorded[f"baselines/linear-probe/seed{seed}/fits"] = probe.fits
    return recorded


def _baseline_lines(ev: Evaluation) -> list[str]:
    """What the report says about how each baseline was built (templates, the probe's C)."""
    methods, info, probes = ev.methods, ev.info, ev.probes
    meta, lines = ev.first.text_meta, []
    if "zeroshot" in methods:
        lines.append(f"CLIP zero-shot on {info.dataset}: template {meta.get('zeroshot_template')!r} "
                     f"({meta.get('zeroshot_template_source', 'source not recorded')}).")
    if "zeroshot-ensemble" in methods:
        lines.append(f"CLIP zero-shot, template ensemble on {info.dataset}: "
                     f"{meta.get('ensemble_templates_source', 'source not recorded')}.")
    for target in ev.targets:
        if target.templates is not None:
            lines.append(f"Zero-shot baselines on {target.name} (cross-dataset): template {target.templates.zeroshot!r} "
                         f"({target.templates.zeroshot_source}); ensemble {target.templates.ensemble_source}.")
    if "linear-probe" in methods:
        search = CSearch.from_config(ev.params.evaluation)
        chosen = [f"seed {seed}: C={probe.regularisation_c:.4g} ({probe.fits} fits)" for seed, probe in probes.items()]
        lines.append(f"Linear probe: C chosen on validation by accuracy, then cross-entropy ({search.describe()}); "
                     + "; ".join(chosen) + ".")
    return lines


def _backbone_names(identity: str) -> tuple[str, str]:
    """'ViT-B-16@tag:openai' -> ('ViT-B-16', 'openai'): what the features were really computed with."""
    model, _, weights = identity.partition("@")
    return model, weights.removeprefix("tag:")


def _child_name(scope: str, dataset: str, method: str, info: ClassesManifest, seeds: str) -> str:
    """What the MLflow runs table shows: method, dataset (training -> target for transfer), seeds."""
    where = info.dataset if scope == info.protocol else f"{info.dataset} -> {dataset} ({scope})"
    return f"{method} · {where} · {seeds}"


def _method_tags(scope: str, dataset: str, method: str, info: ClassesManifest, random_init: bool) -> dict[str, str]:
    """The tags of a method's tracker run, per seed or over seeds."""
    return {"method": method, "scope": scope, "dataset": dataset, "train_dataset": info.dataset, "random_init": str(random_init).lower()}


def method_params(method: str, params: Params, info: ClassesManifest) -> dict[str, str]:
    """What tells one method run from another in MLflow's compare view (the same keys for every method)."""
    spec = method_spec(method)
    aape = spec.trainer == DISTILL_GENERATOR
    generator = params.generator
    return {
        "method": method,
        "dataset": info.dataset,
        "protocol": info.protocol,
        "shots": str(info.shots),
        "backbone": params.backbone.model,
        "weights": params.backbone.pretrained,
        "trained_by": spec.trainer,
        "lambda_distill": (str(0.0 if method == "aape-nodistill" else generator.lambda_distill)) if aape else "n/a",
        "aggregator": params.aggregator.variant if method == "aape" else "n/a",
        "head": f"{generator.head}/{generator.head_init}" if aape else "n/a",
        "hyperparameters": _hyperparameters(spec, params),
    }


def _hyperparameters(spec, params: Params) -> str:
    """A trained baseline's settings and schedule in one line (params.yaml `baselines.<method>`)."""
    if spec.trainer != TRAIN_BASELINES:
        return "n/a"
    settings = getattr(params.baselines, spec.key).model_dump(mode="json")
    schedule = settings.pop("schedule")
    settings.update({k: schedule[k] for k in ("optimizer", "lr", "epochs", "batch_size")})
    return ", ".join(f"{k}={v}" for k, v in settings.items())[:500]  # MLflow's limit on a param value


def _baseline_tags(bundle: FeatureBundle, probe: LinearProbe | None) -> dict[str, dict[str, str]]:
    """Per method, the tracker tags saying how its baseline was built on the training dataset."""
    meta = bundle.text_meta
    tags = {
        "zeroshot": {"template": str(meta.get("zeroshot_template")), "template_source": str(meta.get("zeroshot_template_source"))},
        "zeroshot-ensemble": {"templates_source": str(meta.get("ensemble_templates_source"))},
    }
    if probe is not None:
        tags["linear-probe"] = {"C": f"{probe.regularisation_c:.6g}", "fits": str(probe.fits)}
    return tags


def _log_children(tracker: Tracker, outcomes: list[SetOutcome], info: ClassesManifest, bundle: FeatureBundle, params: Params,
                  method_tags: dict[str, dict[str, str]] | None = None) -> None:
    groups: dict[tuple[str, str, str], list[SetOutcome]] = {}
    for outcome in outcomes:
        groups.setdefault((outcome.scope, outcome.dataset, outcome.method), []).append(outcome)
    for (scope, dataset, method), group in groups.items():
        tags = {**_method_tags(scope, dataset, method, info, bundle.random_init), "seed": str(bundle.seed)}
        if scope == info.protocol:
            tags.update((method_tags or {}).get(method, {}))
        with tracker.child(_child_name(scope, dataset, method, info, f"seed {bundle.seed}"), tags=tags) as child:
            child.log_params({**method_params(method, params, info), "seed": str(bundle.seed)})
            child.log_metrics(seed_metrics(group))
            notes = sorted({o.note for o in group if o.note})
            if notes:
                child.set_tags({"not_applicable": "; ".join(notes)})


def _write_outputs(ev: Evaluation) -> dict[str, Any]:
    """eval/: results and per-class tables, metrics.json, the figures and report.md."""
    out = ev.layout.eval
    plots_dir = out / "plots"
    shutil.rmtree(plots_dir, ignore_errors=True)  # figures of an earlier run must not linger beside these
    plots_dir.mkdir(parents=True, exist_ok=True)
    tables = _tables(ev)
    files = [write_parquet(tables.results, out / "results.parquet"), write_parquet(tables.per_class, out / "per_class.parquet")]
    atomic_write_json(ev.layout.metrics, tables.metrics)
    files.append(ev.layout.metrics)
    figures, remarks = _figures(ev, tables, plots_dir)
    report = out / "report.md"
    atomic_write_text(report, render_report(_report_context(ev, tables, figures, remarks)))
    files += [report, plots_dir]
    return {"files": files, "metrics": tables.metrics, "summary": tables.summary, "artifacts": [report, ev.layout.metrics, out / "results.parquet",
                                                                    out / "per_class.parquet", plots_dir]}


def _tables(ev: Evaluation) -> Tables:
    bundle = ev.first
    results = results_frame(ev.outcomes, shots=ev.info.shots, backbone=bundle.identity, random_init=bundle.random_init)
    summary = summarise(results)
    metrics: dict[str, Any] = {**flat_metrics(summary), "random_init": bundle.random_init,
                               **_baseline_metrics(bundle, ev.methods, ev.probes)}
    return Tables(results, per_class_frame(ev.outcomes), summary, metrics)


def _figures(ev: Evaluation, tables: Tables, plots_dir: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(caption, file) of every figure drawn into plots_dir, and the remarks the report adds about them."""
    info, methods, params = ev.info, ev.methods, ev.params
    figures: list[tuple[str, str]] = []
    remarks: list[str] = [note for target in ev.targets for note in target.notes]
    curve = shots_curve(tables.results, ev.extra_results, info.protocol, info.dataset, methods)
    if len(curve):
        label = "H (%)" if info.protocol == BASE2NEW else "accuracy (%)"
        path, remark = accuracy_vs_shots(curve, label, plots_dir / "accuracy_vs_shots.png",
                                         f"{info.dataset}: {label} against shots (mean ± std over seeds)")
        figures.append(("Accuracy against shots", path))
        remarks.append(remark)
    figures += per_class_figures(tables.per_class, methods, info.protocol, info.dataset, plots_dir)
    confusion_method = "aape" if "aape" in methods else methods[-1]
    for caption, path, remark in confusion_figures(ev.outcomes, confusion_method, ev.first.seed, info.protocol, plots_dir,
                                                   params.evaluation.confusion_max_classes):
        figures.append((caption, path))
    attention, remark = attention_figure(ev.layout, ev.first, info.train_classes, info.classnames,
                                         params.evaluation.attention_examples, plots_dir / "attention_descriptions.png")
    remarks.append(remark)
    if attention is not None:
        figures.append(("Aggregator attention over one class's descriptions (the paper's figure 7)", attention))
    if ev.first.random_init:  # each PNG says so itself, wherever it is seen without the report
        for _, path in figures:
            stamp_notice(Path(path), RANDOM_INIT_NOTICE)
    return figures, remarks


def _report_context(ev: Evaluation, tables: Tables, figures: list[tuple[str, str]], remarks: list[str]) -> ReportContext:
    bundle, info, out = ev.first, ev.info, ev.layout.eval
    model_name, weights = _backbone_names(bundle.identity)
    set_sizes = {(o.scope, o.dataset, o.eval_set): (o.total, len(o.classes)) for o in ev.outcomes if o.applicable}
    return ReportContext(
        dataset=info.dataset, protocol=info.protocol, shots=info.shots, seeds=list(ev.params.run.seeds),
        backbone_model=model_name, pretrained=weights, identity=bundle.identity,
        random_init=bundle.random_init, methods=ev.methods, summary=tables.summary, notes=notes_by_method(ev.outcomes),
        baselines=_baseline_lines(ev),
        set_sizes=set_sizes, plots=[(caption, str(Path(p).relative_to(out))) for caption, p in figures], remarks=remarks,
    )
