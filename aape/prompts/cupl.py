"""Importing CuPL-style description files, `{class name: [sentences]}`, with tolerant name matching.

Keys in community files rarely spell class names exactly as the dataset does ('Apply Eye Makeup'
vs 'Apply_Eye_Makeup', 'Annual Crop Land' vs 'annual crop land'). A class matches a key when they
are equal, else equal after case-folding, '_' -> ' ' and collapsing spaces, else equal once only
letters and digits are kept ('AnnualCrop' = 'Annual Crop'); failing that, the dataset loader's own
renames are tried both ways (EuroSAT's folder 'AnnualCrop' is CoOp's class 'Annual Crop Land').
A class whose key holds no usable sentence counts as unmatched, like a class with no key.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

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
    unmatched: list[int] = field(default_factory=list)  # no key, or a key without usable sentences
    unused_keys: list[str] = field(default_factory=list)
    empty_keys: dict[int, str] = field(default_factory=dict)  # unmatched class index -> its empty key


class _KeyIndex:
    """The file's keys by exact, normalised and letters-and-digits spelling."""

    def __init__(self, file_keys: list[str], source: str) -> None:
        self.exact = set(file_keys)
        self.by_norm: dict[str, list[str]] = {}
        self.by_squash: dict[str, list[str]] = {}
        for key in file_keys:
            self.by_norm.setdefault(normalise_name(key), []).append(key)
            self.by_squash.setdefault(squash_name(key), []).append(key)
        self.source = source

    def find(self, name: str) -> str | None:
        """The one key spelling `name` (exact first, then looser), None if none; several is an error."""
        if name in self.exact:
            return name
        for candidates in (self.by_norm.get(normalise_name(name), []), self.by_squash.get(squash_name(name), [])):
            if len(candidates) > 1:
                raise CuplFileError(f"class '{name}' matches several keys of {self.source}: {candidates}; merge or rename them")
            if candidates:
                return candidates[0]
        return None


def rename_aliases(renames: Mapping[str, str]) -> dict[str, list[str]]:
    """Squashed name -> its other spellings under a loader's {folder: class name} renames, both ways:
    a file may be keyed by folder names or by the renamed class names."""
    aliases: dict[str, list[str]] = {}
    for folder, name in renames.items():
        if squash_name(folder) != squash_name(name):
            aliases.setdefault(squash_name(folder), []).append(name)
            aliases.setdefault(squash_name(name), []).append(folder)
    return aliases


def match_classes(classnames: list[str], file_keys: list[str], source: str = "the file",
                  renames: Mapping[str, str] | None = None) -> Match:  # fmt: skip
    """Match each class to one key (exact, normalised, letters and digits only, then via `renames`)."""
    keys = _KeyIndex(file_keys, source)
    aliases = rename_aliases(renames or {})
    match = Match()
    for index, name in enumerate(classnames):
        key = next((k for k in map(keys.find, [name, *aliases.get(squash_name(name), [])]) if k is not None), None)
        if key is None:
            match.unmatched.append(index)
        else:
            match.keys[index] = key
    used = set(match.keys.values())
    match.unused_keys = [k for k in file_keys if k not in used]
    _warn_shared_keys(classnames, match, source)
    return match


def _warn_shared_keys(classnames: list[str], match: Match, source: str) -> None:
    taken = list(match.keys.values())
    for key in sorted({k for k in taken if taken.count(k) > 1}):
        names = [classnames[i] for i, k in match.keys.items() if k == key]
        log.warning("classes %s all take the descriptions of key %r in %s", names, key, source)


def mark_empty(match: Match, usable: Mapping[str, int]) -> None:
    """Move classes whose key has no usable sentence (`usable`: key -> count) to the unmatched."""
    for index, key in sorted(match.keys.items()):
        if usable.get(key, 0) == 0:
            del match.keys[index]
            match.empty_keys[index] = key
            match.unmatched.append(index)
    match.unmatched.sort()


def log_unused_keys(match: Match, source: str, limit: int = 10) -> None:
    """Warn about keys that no class took: often a class spelt differently, otherwise harmless."""
    if not match.unused_keys:
        return
    shown = ", ".join(repr(k) for k in match.unused_keys[:limit])
    more = f" and {len(match.unused_keys) - limit} more" if len(match.unused_keys) > limit else ""
    log.warning("%d key(s) of %s match no class and are ignored: %s%s", len(match.unused_keys), source, shown, more)


def unmatched_report(classnames: list[str], match: Match, source: str) -> str:
    """Lines naming each unmatched class with the closest unused keys, for the error and the log."""
    lines = [f"  - class {index} '{classnames[index]}'{_why_unmatched(classnames[index], index, match)}" for index in match.unmatched]
    return f"{len(match.unmatched)} of {len(classnames)} classes have no descriptions in {source}:\n" + "\n".join(lines)


def _why_unmatched(name: str, index: int, match: Match) -> str:
    if index in match.empty_keys:
        return f": key {match.empty_keys[index]!r} has no usable description (empty list, or only blanks and refusals)"
    close = difflib.get_close_matches(normalise_name(name), [normalise_name(k) for k in match.unused_keys], n=3, cutoff=0.5)
    return f" (closest unused keys: {close})" if close else ""


def check_unmatched(classnames: list[str], match: Match, source: str, allow_unmatched: bool) -> None:
    if not match.unmatched:
        return
    report = unmatched_report(classnames, match, source)
    if not allow_unmatched:
        raise UnmatchedClassesError(
            f"{report}\nAdd descriptions for those classes to {source} (or rename its keys to the class names), "
            "or set prompts.allow_unmatched: true to give them only the fallback description 'a photo of a {class}.'"
        )
    log.warning("%s\nprompts.allow_unmatched is true: those classes get the fallback description 'a photo of a {class}.'", report)
