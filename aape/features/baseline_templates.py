"""The templates of the two zero-shot CLIP baselines, chosen per dataset.

`zeroshot` uses CoOp's hand-written template of the dataset and `zeroshot-ensemble` CLIP's published
template set (both in baseline_templates.yaml, with their sources), so that the baselines are the
ones the reference numbers were measured with. `features.zeroshot_template` and
`features.ensemble_templates` replace them when they are not 'auto'. AAPE does not use these: it
keeps `features.class_template` on every dataset (CuPL uses the descriptions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from aape.config import AUTO, FeaturesConfig, template_problem
from aape.data.registry import canonical_name
from aape.features.bundle import FeatureError

log = logging.getLogger(__name__)

TEMPLATES_FILE = Path(__file__).with_name("baseline_templates.yaml")
COOP_SOURCE = "CoOp trainers/zsclip.py"
CLIP_SOURCE = {"ImageNet": "CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb"}
CLIP_PROMPTS_SOURCE = "CLIP data/prompts.md"
FALLBACK_ENSEMBLE = "ImageNet"


@dataclass(frozen=True)
class DatasetTemplates:
    """One dataset's row of baseline_templates.yaml."""

    zeroshot: str
    coop: str | None  # CoOp's CUSTOM_TEMPLATES key; None when CoOp has no template for the dataset
    ensemble: str  # name of a CLIP template set


@dataclass(frozen=True)
class TemplateTable:
    fallback_zeroshot: str
    datasets: dict[str, DatasetTemplates]
    ensembles: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class BaselineTemplates:
    """The templates the zero-shot baselines of one dataset use, and where each came from."""

    dataset: str
    zeroshot: str
    zeroshot_source: str
    ensemble: tuple[str, ...]
    ensemble_source: str

    def metadata(self) -> dict[str, Any]:
        """What text.safetensors and the report record about the baselines."""
        return {
            "baseline_dataset": self.dataset,
            "zeroshot_template": self.zeroshot,
            "zeroshot_template_source": self.zeroshot_source,
            "ensemble_templates": list(self.ensemble),
            "ensemble_templates_source": self.ensemble_source,
        }


def _check(template: Any, where: str) -> str:
    problem = template_problem(template)
    if problem:
        raise FeatureError(f"{TEMPLATES_FILE}: {where} {template!r} {problem}")
    return template


@lru_cache(maxsize=2)
def load_template_table(path: Path = TEMPLATES_FILE) -> TemplateTable:
    """baseline_templates.yaml, validated (a broken file is an installation problem, named as such)."""
    try:
        tree: Any = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise FeatureError(f"cannot read the baseline template file {path}: {exc}") from None
    if not isinstance(tree, dict) or not all(isinstance(tree.get(k), dict) for k in ("datasets", "ensembles")):
        raise FeatureError(f"{path} must hold 'fallback_zeroshot', 'datasets' and 'ensembles'")
    ensembles: dict[str, tuple[str, ...]] = {}
    for name, templates in tree["ensembles"].items():
        if not isinstance(templates, list) or not templates:
            raise FeatureError(f"{path}: ensemble {name!r} must be a non-empty list of templates")
        ensembles[str(name)] = tuple(_check(t, f"ensemble {name!r} template") for t in templates)
    datasets: dict[str, DatasetTemplates] = {}
    for key, entry in tree["datasets"].items():
        if not isinstance(entry, dict) or entry.get("ensemble") not in ensembles:
            raise FeatureError(f"{path}: dataset {key!r} needs 'zeroshot' and an 'ensemble' among {', '.join(ensembles)}")
        coop = entry.get("coop")
        datasets[str(key)] = DatasetTemplates(_check(entry.get("zeroshot"), f"dataset {key!r} zeroshot"),
                                              None if coop is None else str(coop), str(entry["ensemble"]))
    fallback = _check(tree.get("fallback_zeroshot"), "fallback_zeroshot")
    if FALLBACK_ENSEMBLE not in ensembles:
        raise FeatureError(f"{path} must define the {FALLBACK_ENSEMBLE!r} ensemble (the fallback)")
    return TemplateTable(fallback, datasets, ensembles)


def baseline_templates(cfg: FeaturesConfig, dataset: str) -> BaselineTemplates:
    """The zero-shot and ensemble templates for `dataset`: the data file's for 'auto', else the config's."""
    table = load_template_table()
    key = canonical_name(dataset)
    entry = table.datasets.get(key)
    if entry is None:  # a dataset added to aape.data without a row here (tests check there is none)
        log.warning("no baseline templates listed for dataset %r: using CoOp's generic template and CLIP's ImageNet set", key)
        entry = DatasetTemplates(table.fallback_zeroshot, None, FALLBACK_ENSEMBLE)
    if cfg.zeroshot_template != AUTO:
        zeroshot, zeroshot_source = cfg.zeroshot_template, "features.zeroshot_template"
    elif entry.coop is not None:
        zeroshot, zeroshot_source = entry.zeroshot, f"{COOP_SOURCE} CUSTOM_TEMPLATES[{entry.coop!r}]"
    else:
        zeroshot, zeroshot_source = entry.zeroshot, f"CoOp has no template for {key}: its generic one"
    if cfg.ensemble_templates != AUTO:
        ensemble, ensemble_source = tuple(cfg.ensemble_templates), "features.ensemble_templates"
    else:
        ensemble = table.ensembles[entry.ensemble]
        ensemble_source = CLIP_SOURCE.get(entry.ensemble, f"{CLIP_PROMPTS_SOURCE}, {entry.ensemble}")
    return BaselineTemplates(key, zeroshot, zeroshot_source, ensemble, f"{ensemble_source} ({len(ensemble)} template{'s' if len(ensemble) != 1 else ''})")
