"""Turning raw LLM answers into descriptions: trim, drop empty answers, refusals and duplicates."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

# Openings that mean the model declined instead of describing (checked after trimming, any case).
_REFUSAL_OPENINGS = (
    "i'm sorry",
    "i am sorry",
    "sorry,",
    "i cannot",
    "i can't",
    "i can not",
    "i'm unable",
    "i am unable",
    "i'm not able",
    "i am not able",
    "i don't have",
    "i do not have",
    "as an ai",
    "as a language model",
)
_REFUSAL_ANYWHERE = ("as an ai language model", "i cannot provide a description", "i can't provide a description")
_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\d{1,2}[.)])\s+")
_WRAPPING_QUOTES = ('"', "'", "\u201c", "\u201d", "`")
_SENTENCE_END = re.compile(r"[.!?](?=[\"')\]]*(?:\s|$))")
MIN_SENTENCE_CHARS = 20  # shorter leftovers of a cut answer are kept whole rather than cut to nothing


def clean_text(raw: str, truncated: bool = False, trim_truncated: bool = True) -> str:
    """Collapse whitespace, drop a list marker and wrapping quotes; cut a truncated answer to its last full sentence."""
    text = " ".join(raw.split())
    text = _LIST_MARKER.sub("", text)
    while len(text) >= 2 and text[0] in _WRAPPING_QUOTES and text[-1] in _WRAPPING_QUOTES:
        text = text[1:-1].strip()
    if truncated and trim_truncated:
        ends = [m.end() for m in _SENTENCE_END.finditer(text)]
        if ends and ends[-1] >= MIN_SENTENCE_CHARS:
            text = text[: ends[-1]]
    return text.strip()


def is_refusal(text: str) -> bool:
    lowered = text.lower()
    return lowered.startswith(_REFUSAL_OPENINGS) or any(p in lowered for p in _REFUSAL_ANYWHERE)


@dataclass
class CleanResult:
    """Which answers survive (by position, with their clean text) and why the others did not."""

    kept: list[tuple[int, str]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)


def clean_answers(raw_answers: list[tuple[str, bool]], trim_truncated: bool = True) -> CleanResult:
    """(raw text, was truncated) per answer of one class -> kept (position, text); first of duplicates wins."""
    result = CleanResult()
    seen: set[str] = set()
    for position, (raw, truncated) in enumerate(raw_answers):
        text = clean_text(raw, truncated, trim_truncated)
        if not text:
            result.dropped["empty"] += 1
        elif is_refusal(text):
            result.dropped["refusal"] += 1
        elif text in seen:
            result.dropped["duplicate"] += 1
        else:
            seen.add(text)
            result.kept.append((position, text))
    return result
