"""From a class list to description rows and a summary, for any of the three sources.

LLM sources: plan one job per (class, LLM-prompt, sample index), take what the journal already has,
request only the rest (persisting each answer as it arrives), then clean and assemble the rows in
plan order. The CuPL source reads a file instead. All produce rows of `table.DESCRIPTION_SCHEMA`.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aape.config import Params, PromptsConfig
from aape.data.manifests import ClassNames
from aape.data.registry import class_renames
from aape.locks import exclusive_lock
from aape.prompts.answers import RunStats, Sampling
from aape.prompts.cleaning import CleanResult, clean_answers
from aape.prompts.cupl import Match, check_unmatched, log_unused_keys, mark_empty, match_classes, read_cupl_file
from aape.prompts.errors import TooFewDescriptionsError
from aape.prompts.journal import Journal, SampleJob, request_key
from aape.prompts.templates import TemplateSet, display_name, select_templates

log = logging.getLogger(__name__)

IMPORTED_TEMPLATE = "(imported)"
FALLBACK_TEMPLATE = "a photo of a {}."
FALLBACK_SOURCE = "fallback"
OPENAI_DEFAULT_ENDPOINT = "https://api.openai.com/v1"


@dataclass
class Descriptions:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]


# planning ------------------------------------------------------------------------------------------
def source_identity(cfg: PromptsConfig) -> dict[str, str]:
    """What, besides the question and sampling, determines an answer (part of every request key)."""
    if cfg.source == "openai":
        return {"source": "openai", "model": cfg.openai.model, "endpoint": cfg.openai.base_url or OPENAI_DEFAULT_ENDPOINT}
    return {"source": "local", "model": cfg.local.model}


def plan_jobs(classes: ClassNames, templates: TemplateSet, n_per_template: int, sampling: Sampling, identity: dict[str, str]) -> list[SampleJob]:
    """One job per (class, LLM-prompt, sample index), in the order rows are written."""
    jobs = []
    for index, name in enumerate(classes.classnames):
        for template in templates.prompts:
            question = templates.question(template, name)
            for sample in range(n_per_template):
                key = request_key(
                    **identity,
                    system=templates.system,
                    template=template,
                    question=question,
                    class_name=name,
                    sample_index=sample,
                    temperature=sampling.temperature,
                    max_tokens=sampling.max_tokens,
                )
                jobs.append(SampleJob(index, name, template, question, sample, key))
    return jobs


def journal_path(params: Params) -> Path:
    return Path(params.run.cache_dir) / "prompts" / "journal.jsonl"


# the sources -----------------------------------------------------------------------------------------
def _answer_missing(params: Params, jobs: list[SampleJob], system: str, sampling: Sampling, persist: Any) -> RunStats:
    cfg = params.prompts
    if cfg.source == "openai":
        from aape.prompts.openai_source import answer_jobs_openai

        return answer_jobs_openai(jobs, cfg.openai, system, sampling, persist)
    from aape.prompts.local_source import answer_jobs_local

    return answer_jobs_local(jobs, cfg.local, system, sampling, persist, device=params.run.device)


def generate_from_llm(params: Params, classes: ClassNames) -> Descriptions:
    """Ask the configured LLM (journal first), then clean and assemble the rows."""
    cfg = params.prompts
    templates = select_templates(cfg.templates, classes.dataset, cfg.max_templates)
    sampling = Sampling(cfg.temperature, cfg.max_tokens)
    identity = source_identity(cfg)
    jobs = plan_jobs(classes, templates, cfg.n_per_template, sampling, identity)
    journal = Journal(journal_path(params))
    # a concurrent run of the same plan waits here, then finds every answer in the journal
    with exclusive_lock(plan_lock_path(params, jobs), f"the LLM answers of plan {plan_digest(jobs)}"):
        answers = journal.load()
        missing = [job for job in jobs if job.key not in answers]
        log.info(
            "%s model %s, LLM-prompts '%s' (%d), %d classes x %d prompts x %d samples = %d answers: %d in the journal %s, %d to request",
            identity["source"], identity["model"], templates.name, len(templates.prompts), len(classes.classnames),
            len(templates.prompts), cfg.n_per_template, len(jobs), len(jobs) - len(missing), journal.path, len(missing),
        )  # fmt: skip
        stats = _request_into_journal(params, missing, templates.system, sampling, journal, answers)
    rows, dropped = _rows_from_answers(classes, jobs, answers, cfg.trim_truncated)
    summary = _summary(params, classes, rows, dropped, stats, jobs, len(jobs) - len(missing), answers)
    summary["templates"] = {"set": templates.name, "system": templates.system, "prompts": list(templates.prompts)}
    summary["journal"] = str(journal.path)
    return Descriptions(rows, summary)


def plan_digest(jobs: list[SampleJob]) -> str:
    return hashlib.sha256("\n".join(sorted(job.key for job in jobs)).encode()).hexdigest()[:24]


def plan_lock_path(params: Params, jobs: list[SampleJob]) -> Path:
    """One lock per set of planned answers: identical runs serialise, different ones do not wait."""
    return journal_path(params).parent / "locks" / f"{plan_digest(jobs)}.lock"


def _request_into_journal(params: Params, missing: list[SampleJob], system: str, sampling: Sampling, journal: Journal,
                          answers: dict[str, dict[str, Any]]) -> RunStats:  # fmt: skip
    """Request the missing answers, persisting each into the journal and `answers` as it arrives."""

    def persist(entries: list[dict[str, Any]]) -> None:
        journal.append(entries)
        for entry in entries:
            answers.setdefault(entry["key"], entry)

    before = len(answers)
    try:
        return _answer_missing(params, missing, system, sampling, persist)
    except BaseException:
        log.error("stopped with %d new answers saved in %s; rerun to resume: only missing answers are requested", len(answers) - before, journal.path)
        raise
    finally:
        journal.close()


def _rows_from_answers(classes: ClassNames, jobs: list[SampleJob], answers: dict[str, dict[str, Any]], trim_truncated: bool) -> tuple[list[dict[str, Any]], Counter]:
    rows: list[dict[str, Any]] = []
    dropped: Counter = Counter()
    by_class: dict[int, list[SampleJob]] = {}
    for job in jobs:
        by_class.setdefault(job.class_index, []).append(job)
    for index, class_jobs in by_class.items():
        entries = [answers[job.key] for job in class_jobs]
        cleaned = clean_answers([(e["raw_text"], e.get("finish_reason") == "length") for e in entries], trim_truncated)
        dropped.update(cleaned.dropped)
        for position, text in cleaned.kept:
            job, entry = class_jobs[position], entries[position]
            rows.append(
                {
                    "dataset": classes.dataset,
                    "class_index": index,
                    "class_name": job.class_name,
                    "template": job.template,
                    "text": text,
                    "raw_text": entry["raw_text"],
                    "source": entry["source"],
                    "temperature": entry["temperature"],
                    "sample_index": job.sample_index,
                    "request_id": entry.get("request_id"),
                    "prompt_tokens": entry.get("prompt_tokens"),
                    "completion_tokens": entry.get("completion_tokens"),
                    "created_at": datetime.fromisoformat(entry["created_at"]),
                }
            )
    return rows, dropped


def import_cupl(params: Params, classes: ClassNames) -> Descriptions:
    """Rows from a CuPL-style JSON file; unmatched classes fail unless prompts.allow_unmatched."""
    cfg = params.prompts
    path = Path(cfg.file or "")
    tree = read_cupl_file(path)
    # the loader's renames: a file keyed by EuroSAT's folder names still fits CoOp's class names
    match = match_classes(classes.classnames, list(tree), source=str(path), renames=class_renames(classes.dataset))
    cleaned = {key: clean_answers([(s, False) for s in tree[key]], cfg.trim_truncated) for key in set(match.keys.values())}
    mark_empty(match, {key: len(result.kept) for key, result in cleaned.items()})
    log_unused_keys(match, str(path))
    check_unmatched(classes.classnames, match, str(path), cfg.allow_unmatched)
    rows, dropped = _imported_rows(classes, tree, match, cleaned, f"cupl-json:{path.name}")
    summary = _summary(params, classes, rows, dropped, RunStats(), [], 0, {})
    summary["file"] = str(path)
    summary["matched_keys"] = {classes.classnames[i]: k for i, k in sorted(match.keys.items()) if classes.classnames[i] != k}
    summary["unmatched_classes"] = [classes.classnames[i] for i in match.unmatched]
    summary["empty_file_keys"] = {classes.classnames[i]: k for i, k in sorted(match.empty_keys.items())}
    summary["unused_file_keys"] = match.unused_keys
    return Descriptions(rows, summary)


def _imported_rows(classes: ClassNames, tree: dict[str, list[str]], match: Match, cleaned: dict[str, CleanResult],
                   source: str) -> tuple[list[dict[str, Any]], Counter]:  # fmt: skip
    """The matched classes' cleaned sentences in file order; the fallback for the unmatched."""
    base = {"dataset": classes.dataset, "temperature": None, "request_id": None, "prompt_tokens": None,
            "completion_tokens": None, "created_at": datetime.now(timezone.utc)}  # fmt: skip
    rows: list[dict[str, Any]] = []
    dropped: Counter = Counter()
    for index, name in enumerate(classes.classnames):
        if index in match.keys:
            key = match.keys[index]
            dropped.update(cleaned[key].dropped)
            for position, text in cleaned[key].kept:
                rows.append({**base, "class_index": index, "class_name": name, "template": IMPORTED_TEMPLATE, "text": text,
                             "raw_text": tree[key][position], "source": source, "sample_index": position})  # fmt: skip
        else:
            text = FALLBACK_TEMPLATE.replace("{}", display_name(name))
            rows.append({**base, "class_index": index, "class_name": name, "template": FALLBACK_TEMPLATE, "text": text,
                         "raw_text": text, "source": FALLBACK_SOURCE, "sample_index": 0})  # fmt: skip
    return rows, dropped


# checks and summary ----------------------------------------------------------------------------------
def per_class_counts(classes: ClassNames, rows: list[dict[str, Any]]) -> list[int]:
    counts = [0] * len(classes.classnames)
    for row in rows:
        counts[row["class_index"]] += 1
    return counts


LLM_REMEDY = "Raise prompts.n_per_template (answers already obtained are kept in the journal; only the new samples are requested)"


def file_remedy(path: str) -> str:
    return f"Add descriptions for those classes to {path}"


def check_min_per_class(classes: ClassNames, counts: list[int], minimum: int, dropped: Counter, remedy: str = LLM_REMEDY) -> None:
    """`remedy` says how the source gets more descriptions (more samples, or a fuller file)."""
    short = [(i, classes.classnames[i], n) for i, n in enumerate(counts) if n < minimum]
    if short:
        listed = ", ".join(f"'{name}' (class {i}: {n})" for i, name, n in short[:20])
        more = f" and {len(short) - 20} more" if len(short) > 20 else ""
        raise TooFewDescriptionsError(
            f"{len(short)} class(es) kept fewer than prompts.min_per_class={minimum} descriptions after cleaning: "
            f"{listed}{more}. Dropped overall: {dict(dropped) or 'none'}. {remedy}, or lower prompts.min_per_class"
        )


def _cost(cfg: PromptsConfig, prompt_tokens: int, completion_tokens: int) -> float:
    if cfg.source != "openai":
        return 0.0
    return prompt_tokens / 1000 * cfg.openai.price_per_1k_input_tokens + completion_tokens / 1000 * cfg.openai.price_per_1k_output_tokens


def _summary(params: Params, classes: ClassNames, rows: list[dict[str, Any]], dropped: Counter, stats: RunStats,
             jobs: list[SampleJob], from_journal: int, answers: dict[str, dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    cfg = params.prompts
    counts = per_class_counts(classes, rows)
    used = [answers[job.key] for job in jobs]
    prompt_tokens = sum(e.get("prompt_tokens") or 0 for e in used)
    completion_tokens = sum(e.get("completion_tokens") or 0 for e in used)
    names = classes.classnames
    duplicated = {n for n in names if names.count(n) > 1}
    model = {"openai": cfg.openai.model, "local": cfg.local.model}.get(cfg.source, Path(cfg.file or "").name)
    return {
        "dataset": classes.dataset,
        "source": cfg.source,
        "model": model,
        "n_per_template": cfg.n_per_template,
        "temperature": cfg.temperature,
        "max_tokens": cfg.max_tokens,
        "classes": len(names),
        "descriptions": len(rows),
        "descriptions_per_class": {(f"{n} #{i}" if n in duplicated else n): c for i, (n, c) in enumerate(zip(names, counts))},
        "dropped": {"empty": dropped["empty"], "refusal": dropped["refusal"], "duplicate": dropped["duplicate"]},
        "requests": {
            "planned": len(jobs),
            "from_journal": from_journal,
            "sent": stats.requests,
            "answers_received": stats.answers,
            "retries": stats.retries,
            "retry_reasons": dict(stats.retry_reasons),
            "retry_wait_s": round(stats.retry_wait_s, 3),
        },
        "tokens": {"prompt": prompt_tokens, "completion": completion_tokens, "total": prompt_tokens + completion_tokens},
        "tokens_this_run": {"prompt": stats.prompt_tokens, "completion": stats.completion_tokens, "total": stats.prompt_tokens + stats.completion_tokens},
        "estimated_cost_usd": {
            "all_answers": round(_cost(cfg, prompt_tokens, completion_tokens), 6),
            "this_run": round(_cost(cfg, stats.prompt_tokens, stats.completion_tokens), 6),
            "price_per_1k_input_tokens": cfg.openai.price_per_1k_input_tokens if cfg.source == "openai" else 0.0,
            "price_per_1k_output_tokens": cfg.openai.price_per_1k_output_tokens if cfg.source == "openai" else 0.0,
        },
        "created_at": datetime.now(timezone.utc).isoformat(),
    }


def build_descriptions(params: Params, classes: ClassNames) -> Descriptions:
    """The rows and summary for the configured source, checked against prompts.min_per_class."""
    result = import_cupl(params, classes) if params.prompts.source == "cupl-json" else generate_from_llm(params, classes)
    counts = per_class_counts(classes, result.rows)
    fallback = {r["class_index"] for r in result.rows if r["source"] == FALLBACK_SOURCE}
    remedy = file_remedy(str(params.prompts.file)) if params.prompts.source == "cupl-json" else LLM_REMEDY
    check_min_per_class(classes, [max(n, params.prompts.min_per_class) if i in fallback else n for i, n in enumerate(counts)],
                        params.prompts.min_per_class, Counter(result.summary["dropped"]), remedy)  # fmt: skip
    return result


def log_counts(classes: ClassNames, rows: list[dict[str, Any]], limit: int = 50) -> None:
    """Per-class counts (all of them for up to `limit` classes, else the spread and the smallest)."""
    counts = per_class_counts(classes, rows)
    if len(counts) <= limit:
        log.info("descriptions per class: %s", ", ".join(f"{name}={n}" for name, n in zip(classes.classnames, counts)))
        return
    smallest = sorted(range(len(counts)), key=counts.__getitem__)[:10]
    log.info(
        "descriptions per class: min %d, median %g, max %d; smallest: %s",
        min(counts), statistics.median(counts), max(counts), ", ".join(f"{classes.classnames[i]}={counts[i]}" for i in smallest),
    )  # fmt: skip
