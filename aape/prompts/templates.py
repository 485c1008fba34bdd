"""Per-dataset LLM-prompts (templates.yaml) and the choice among them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from aape.data.registry import name_key
from aape.prompts.errors import TemplateError

log = logging.getLogger(__name__)

TEMPLATES_FILE = Path(__file__).with_name("templates.yaml")
GENERIC = "generic"
MIN_TEMPLATES, MAX_TEMPLATES = 2, 9


@dataclass(frozen=True)
class TemplateSet:
    """The LLM-prompts chosen for one run, with the system message sent before each."""

    name: str
    system: str
    prompts: tuple[str, ...]

    def question(self, template: str, class_name: str) -> str:
        return template.replace("{}", display_name(class_name))


def display_name(class_name: str) -> str:
    """How a class name reads inside a question: 'Apply_Eye_Makeup' -> 'Apply Eye Makeup'."""
    return " ".join(class_name.replace("_", " ").split())


@lru_cache(maxsize=4)
def load_template_file(path: Path = TEMPLATES_FILE) -> tuple[str, dict[str, tuple[str, ...]], dict[str, str]]:
    """(system message, {dataset: prompts}, {name_key of a name or alias: dataset}); validated."""
    try:
        tree: Any = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TemplateError(f"cannot read the template file {path}: {exc}") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("datasets"), dict) or not isinstance(tree.get("system"), str):
        raise TemplateError(f"{path} must hold 'system: <text>' and 'datasets: {{name: {{prompts: [...]}}}}'")
    datasets: dict[str, tuple[str, ...]] = {}
    names: dict[str, str] = {}
    for name, entry in tree["datasets"].items():
        prompts = entry.get("prompts") if isinstance(entry, dict) else None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise TemplateError(f"{path}: dataset '{name}' needs a list of prompt strings under 'prompts'")
        if not MIN_TEMPLATES <= len(prompts) <= MAX_TEMPLATES:
            raise TemplateError(f"{path}: dataset '{name}' has {len(prompts)} prompts; use {MIN_TEMPLATES} to {MAX_TEMPLATES}")
        for prompt in prompts:
            if prompt.count("{}") != 1:
                raise TemplateError(f"{path}: prompt {prompt!r} of '{name}' must contain '{{}}' exactly once (the class name)")
        datasets[name] = tuple(prompts)
        for alias in [name, *(entry.get("aliases") or [])]:
            key = name_key(str(alias))
            if names.setdefault(key, name) != name:
                raise TemplateError(f"{path}: the name or alias '{alias}' is used by both '{names[key]}' and '{name}'")
    if GENERIC not in datasets:
        raise TemplateError(f"{path} must define a '{GENERIC}' prompt set for datasets it does not know")
    return tree["system"].strip(), datasets, names


def available_template_sets() -> list[str]:
    return list(load_template_file()[1])


def select_templates(choice: str, dataset: str, max_templates: int | None = None) -> TemplateSet:
    """prompts.templates: 'auto' picks by the dataset's name (generic when unknown), else a set by name."""
    system, datasets, names = load_template_file()
    if choice == "auto":
        name = names.get(name_key(dataset))
        if name is None:
            log.info("no LLM-prompts written for dataset '%s': using the generic set", dataset)
            name = GENERIC
    else:
        name = names.get(name_key(choice))
        if name is None:
            raise TemplateError(
                f"prompts.templates: unknown template set {choice!r}. Use 'auto' or one of: {', '.join(datasets)}"
            )
    prompts = datasets[name][:max_templates] if max_templates else datasets[name]
    return TemplateSet(name=name, system=system, prompts=prompts)
