"""Importing CuPL-style description files, `{class name: [sentences]}`, with tolerant name matching.

Keys in community files rarely spell class names exactly as the dataset does ('Apply Eye Makeup'
vs 'Apply_Eye_Makeup', 'Annual Crop Land' vs 'annual crop land'). A class matches a key when they
are equal, else equal after case-folding, '_' -> ' ' and collapsing spaces, else equal once only
letters and digits are kept ('AnnualCrop' = 'Annual Crop').
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from aape.prompts.errors import CuplFileError, UnmatchedClassesError

log = logging.getLogger(__name__)


def normalise_name(name: str) -> str:
    return " ".join(name.casefold().replace("_", " ").split())


def squash_name(name: str) -> str:
    return re.sub(r"[\W_]", "", name.casefold())


def read_cupl_file(path: str | Path) -> dict[str, list[str]]:
    """The file's {class name: [sentences]}, validated; errors name the file and the bad key."""
    path = Path(path)
    if not path.is_file():
        raise CuplFileError(f"CuPL description file {path} not found (prompts.file); give the path of a {{class: [sentences]}} JSON file")
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CuplFileError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(tree, dict) or not tree:
        raise CuplFileError(f"{path} must hold a non-empty JSON object {{class name: [sentences]}}")
    for key, sentences in tree.items():
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise CuplFileError(f"{path}: the value of key {key!r} must be a list of strings (sentences), got {type(sentences).__name__}")
    return tree


@dataclass
class Match:
    """class index -> file key, plus what did not match."""

    keys: dict[int, str] = field(default_factory=dict)
    unmatched: list[int] = field(default_factory=list)
    unused_keys: list[str] = field(default_factory=list)


def match_classes(classnames: list[str], file_keys: list[str], source: str = "the file") -> Match:
    """Match each class to one key (exact, then normalised, then letters and digits only)."""
    by_norm: dict[str, list[str]] = {}
    by_squash: dict[str, list[str]] = {}
    for key in file_keys:
        by_norm.setdefault(normalise_name(key), []).append(key)
        by_squash.setdefault(squash_name(key), []).append(key)
    exact = set(file_keys)
    match = Match()
    for index, name in enumerate(classnames):
        if name in exact:
            match.keys[index] = name
            continue
        for candidates in (by_norm.get(normalise_name(name), []), by_squash.get(squash_name(name), [])):
            if len(candidates) > 1:
                raise CuplFileError(f"class '{name}' matches several keys of {source}: {candidates}; merge or rename them")
            if candidates:
                match.keys[index] = candidates[0]
                break
        else:
            match.unmatched.append(index)
    used = set(match.keys.values())
    match.unused_keys = [k for k in file_keys if k not in used]
    shared = {k for k in used if list(match.keys.values()).count(k) > 1}
    for key in sorted(shared):
        names = [classnames[i] for i, k in match.keys.items() if k == key]
        log.warning("classes %s all take the descriptions of key %r in %s", names, key, source)
    return match


def unmatched_report(classnames: list[str], match: Match, source: str) -> str:
    """Lines naming each unmatched class with the closest unused keys, for the error and the log."""
    lines = []
    for index in match.unmatched:
        close = difflib.get_close_matches(normalise_name(classnames[index]), [normalise_name(k) for k in match.unused_keys], n=3, cutoff=0.5)
        hint = f" (closest unused keys: {close})" if close else ""
        lines.append(f"  - class {index} '{classnames[index]}'{hint}")
    return f"{len(match.unmatched)} of {len(classnames)} classes have no descriptions in {source}:\n" + "\n".join(lines)


def check_unmatched(classnames: list[str], match: Match, source: str, allow_unmatched: bool) -> None:
    if not match.unmatched:
        return
    report = unmatched_report(classnames, match, source)
    if not allow_unmatched:
        raise UnmatchedClassesError(
            report + "\nRename the keys in the file, or set prompts.allow_unmatched: true to give those classes "
            "only the fallback description 'a photo of a {class}.'"
        )
    log.warning("%s\nprompts.allow_unmatched is true: those classes get the fallback description 'a photo of a {class}.'", report)
