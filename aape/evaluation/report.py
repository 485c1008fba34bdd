"""report.md: what a person reads first. Tables in the paper's layout (Base / New / H per dataset
and method), the reference numbers of docs/method.md ("Reference numbers") beside ours when they are comparable
(ViT-B-16 with OpenAI weights), and a bold warning at the very top when the weights are random."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from aape.evaluation.metrics import MeanStd
from aape.methods.registry import METHODS, OTHER_REFERENCES
from aape.evaluation.results import BASE2NEW, CROSS_DATASET, DOMAIN_SHIFT, FEWSHOT

def method_title(method: str) -> str:
    """The method's title in tables and figures, read from the registry when asked (so a method
    registered after import has one too); an unknown name stands for itself."""
    spec = METHODS.get(method)
    return spec.title if spec is not None else method

# docs/method.md, "Reference numbers": ViT-B/16, 16 shots, base-to-new, average over the 11 datasets
# (Base, New, H), each method's from its registry entry, plus published methods not implemented here.
_PAPER_NAMES = {"zeroshot": "CLIP zero-shot", "cupl": "CuPL (description ensemble, no training)", "aape": "AAPE (paper)"}
PAPER_ROW_FOR_METHOD = {name: _PAPER_NAMES.get(name, spec.title) for name, spec in METHODS.items() if spec.reference}
PAPER_REFERENCE: list[tuple[str, str, str, str]] = [
    (PAPER_ROW_FOR_METHOD[name], spec.reference.base, spec.reference.new, spec.reference.H)
    for name, spec in METHODS.items() if spec.reference
] + [(name, ref.base, ref.new, ref.H) for name, ref in OTHER_REFERENCES.items()]

RANDOM_INIT_WARNING = (
    "**RANDOM-INIT BACKBONE: this run used randomly initialised CLIP weights. Its accuracies say "
    "nothing about CLIP, AAPE or the baselines; they only show that the pipeline runs end to end.**"
)


@dataclass
class ReportContext:
    dataset: str
    protocol: str
    shots: int
    seeds: list[int]
    backbone_model: str
    pretrained: str
    identity: str
    random_init: bool
    methods: list[str]
    summary: dict[tuple[str, str, str], dict[str, MeanStd]]
    notes: dict[tuple[str, str, str, str], str] = field(default_factory=dict)
    set_sizes: dict[tuple[str, str, str], tuple[int, int]] = field(default_factory=dict)  # (scope, dataset, set) -> (images, classes)
    plots: list[tuple[str, str]] = field(default_factory=list)  # (caption, path relative to the report)
    remarks: list[str] = field(default_factory=list)
    baselines: list[str] = field(default_factory=list)  # how each baseline was built (templates, the probe's C)

    @property
    def comparable_to_paper(self) -> bool:
        return self.backbone_model == "ViT-B-16" and self.pretrained == "openai"


def _cell(value: MeanStd | None) -> str:
    return "n/a" if value is None else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _footnotes(ctx: ReportContext, scope: str) -> list[str]:
    seen: dict[str, str] = {}
    for (s, dataset, method, eval_set), reason in ctx.notes.items():
        if s == scope:
            where = dataset if eval_set == "all" else f"the {eval_set} classes of {dataset}"
            seen.setdefault(method_title(method), f"n/a on {where}: {reason}")
    return [f"- {method}: {text}." for method, text in seen.items()]


def _own_table(ctx: ReportContext) -> list[str]:
    scope = ctx.protocol
    paper = {name: (b, n, h) for name, b, n, h in PAPER_REFERENCE}
    if scope == BASE2NEW:
        header = ["Method", "Base", "New", "H"]
        if ctx.comparable_to_paper:
            header += ["paper Base*", "paper New*", "paper H*"]
        rows = []
        for method in ctx.methods:
            metrics = ctx.summary.get((scope, ctx.dataset, method), {})
            row = [method_title(method)] + [_cell(metrics.get(k)) for k in ("base_accuracy", "new_accuracy", "H")]
            if ctx.comparable_to_paper:
                row += list(paper.get(PAPER_ROW_FOR_METHOD.get(method, ""), ("", "", "")))
            rows.append(row)
        title = f"## Base-to-new generalisation on {ctx.dataset}"
    else:
        header, rows = ["Method", "Accuracy"], []
        for method in ctx.methods:
            metrics = ctx.summary.get((scope, ctx.dataset, method), {})
            rows.append([method_title(method), _cell(metrics.get("accuracy"))])
        title = f"## Few-shot classification on {ctx.dataset} (all classes)"
    lines = [title, ""]
    sizes = [f"{name}: {n} test images, {c} classes" for (s, d, name), (n, c) in ctx.set_sizes.items() if s == scope and d == ctx.dataset]
    if sizes:
        lines += ["Evaluated on " + "; ".join(sizes) + ".", ""]
    lines += _table(header, rows) + [""]
    if scope == BASE2NEW and ctx.comparable_to_paper:
        lines += ["\\* docs/method.md (Reference numbers): the paper's ViT-B/16 figures, averaged over the 11 datasets, "
                  "not this dataset alone; compare with care.", ""]
    lines += _footnotes(ctx, scope)
    return lines


def _transfer_table(ctx: ReportContext, scope: str, title: str) -> list[str]:
    datasets = list(dict.fromkeys(d for (s, d, _m) in ctx.summary if s == scope))
    if not datasets:
        return []
    rows = []
    for method in ctx.methods:
        cells = [_cell(ctx.summary.get((scope, d, method), {}).get("accuracy")) for d in datasets]
        rows.append([method_title(method), *cells])
    lines = [f"## {title}", "", f"Trained on {ctx.dataset}; accuracy on each target with its own class names.", ""]
    lines += _table(["Method", *datasets], rows) + [""] + _footnotes(ctx, scope)
    return lines + [""]


def render_report(ctx: ReportContext) -> str:
    lines: list[str] = []
    if ctx.random_init:
        lines += [RANDOM_INIT_WARNING, ""]
    lines += [f"# AAPE evaluation: {ctx.dataset}", ""]
    lines += [
        f"- Backbone: `{ctx.backbone_model}`, weights `{ctx.pretrained}` (identity `{ctx.identity}`)",
        f"- Protocol: {ctx.protocol}, {ctx.shots} shots per class, seeds {', '.join(map(str, ctx.seeds))}",
        "- Figures: accuracy in %, mean ± population std over seeds; H = 2BN/(B+N) of the mean B and N "
        "(the paper's convention), its ± is the spread of the per-seed H.",
        "- AAPE is evaluated with the fast head (per-class and per-image parts computed separately); no "
        "LLM and no description is used at test time.",
        "",
    ]
    if ctx.protocol in (BASE2NEW, FEWSHOT):
        lines += _own_table(ctx) + [""]
    lines += _transfer_table(ctx, CROSS_DATASET, "Cross-dataset transfer")
    lines += _transfer_table(ctx, DOMAIN_SHIFT, "Domain shift")
    if ctx.comparable_to_paper and ctx.protocol == BASE2NEW:
        lines += ["## Reference: docs/method.md, Reference numbers (ViT-B/16, 16 shots, base-to-new, 11-dataset average)", ""]
        lines += _table(["Method", "Base", "New", "H"], [list(r) for r in PAPER_REFERENCE]) + [""]
    elif not ctx.comparable_to_paper:
        lines += [f"_The paper's reference numbers (docs/method.md, Reference numbers) are for ViT-B-16 with OpenAI weights; "
                  f"they are not shown for `{ctx.backbone_model}`/`{ctx.pretrained}`._", ""]
    if ctx.baselines:
        lines += ["## Baselines", ""] + [f"- {b}" for b in ctx.baselines] + [""]
    if ctx.remarks:
        lines += ["## Remarks", ""] + [f"- {r}" for r in ctx.remarks] + [""]
    if ctx.plots:
        lines += ["## Plots", ""]
        for caption, path in ctx.plots:
            lines += [f"### {caption}", "", f"![{caption}]({path})", ""]
    return "\n".join(lines).rstrip() + "\n"
