"""Checks a configuration can pass before any stage spends time or money on it.

A run that fails at extract-features on a mistyped backbone tag has already prepared the data and,
with an API source, paid for every description. `preflight` finds such mistakes in a second,
without loading data, models or calling anything: dataset names, backbone name and weights, the
files the configuration names, and the LLM endpoint settings. Each check covers the stages that
would fail on it, so `aape run --from evaluate` is not refused for a prompt setting it never uses.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlparse

from aape.config import IMAGE_TEXT_TASKS, VL_TASKS, ConfigError, Params
from aape.errors import AAPEError

Check = Callable[[Params], list[str]]


def dataset_problems(params: Params) -> list[str]:
    """data.dataset is a known dataset found under data.root, or a custom one whose data.path exists."""
    from aape.data.registry import canonical_name

    if params.run.task in IMAGE_TEXT_TASKS:
        return _image_text_dataset_problems(params, params.data.dataset, "data.dataset")
    try:
        key = canonical_name(params.data.dataset)
    except AAPEError as exc:
        return [str(exc)]
    if key not in ("folder", "manifest"):
        return _folder_problems(params, params.data.dataset, "data.dataset")
    path = params.data.path
    if not path:
        return [f"data.dataset is '{key}' but data.path is not set: give the {_custom_what(key)}"]
    exists = Path(path).is_dir() if key == "folder" else Path(path).is_file()
    return [] if exists else [f"data.path: {path} is not an existing {_custom_what(key)} (data.dataset: {key})"]


def _image_text_dataset_problems(params: Params, name: str, setting: str) -> list[str]:
    """easy-vqa needs its package; COCO and Flickr30k need Karpathy's split file under data.root, VQAv2 also
    its question and annotation files, NoCaps its validation captions."""
    if name == "easy-vqa":
        import importlib.util

        return [] if importlib.util.find_spec("easy_vqa") else [f"{setting} is 'easy-vqa' but the easy-vqa package is not installed: pip install easy-vqa"]
    root = Path(params.data.root)
    from aape.vl.data import NOCAPS_FILE, VQAV2_FILES

    if name == "nocaps":
        needed = [root / "nocaps" / NOCAPS_FILE]
    else:
        karpathy = "coco" if name == "vqav2" else name
        needed = [root / karpathy / f"dataset_{karpathy}.json"]
        if name == "vqav2":
            needed += [root / "vqav2" / f for files in VQAV2_FILES.values() for f in files]
    return [f"{setting}: {path} not found (data.root={params.data.root!r}); see the README, section 'Image-text tasks'"
            for path in needed if not path.is_file()]


def _folder_problems(params: Params, name: str, setting: str) -> list[str]:
    from aape.data.registry import dataset_folder

    folder = dataset_folder(name, params.data.root)
    if folder is None or folder.is_dir() or params.data.download:  # a download makes the folder
        return []
    return [f"{setting}: dataset {name!r} not found: expected the folder {folder} (data.root={params.data.root!r}); "
            "check data.root, or set data.download: true where the dataset can be downloaded"]  # fmt: skip


def _custom_what(key: str) -> str:
    return "folder of class folders" if key == "folder" else "CSV or Parquet manifest file"


def prompt_problems(params: Params) -> list[str]:
    """The configured description source can start: its file, its local model, its endpoint."""
    if params.run.task in IMAGE_TEXT_TASKS:  # the captions are the prompts: no LLM is asked
        return []
    cfg = params.prompts
    if cfg.source == "cupl-json":
        return _cupl_file_problems(cfg.file or "")
    if cfg.source == "local":
        return _local_model_problems(cfg.local.model)
    return _endpoint_problems(params)


def _cupl_file_problems(path: str) -> list[str]:
    from aape.prompts.cupl import read_cupl_file

    try:
        read_cupl_file(path)  # a JSON read: catches a missing file and a malformed one alike
    except AAPEError as exc:
        return [f"prompts.file: {exc}"]
    return []


def _local_model_problems(model: str) -> list[str]:
    from aape.prompts.local_source import resolve_model

    try:
        resolve_model(model)  # finds the file or folder; loading the model waits for the stage
    except AAPEError as exc:
        return [str(exc)]
    return []


def _endpoint_problems(params: Params) -> list[str]:
    cfg = params.prompts.openai
    problems = []
    if cfg.base_url is not None:
        url = urlparse(cfg.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            problems.append(f"prompts.openai.base_url: {cfg.base_url!r} is not an http(s) URL, e.g. http://localhost:8000/v1")
    elif not os.environ.get(cfg.api_key_env):
        # api.openai.com needs a key; a base_url of one's own server may not (the source then sends none)
        problems.append(
            f"prompts.source is 'openai' with no prompts.openai.base_url (api.openai.com) but the environment variable "
            f"{cfg.api_key_env} (prompts.openai.api_key_env) is not set: export the API key there"
        )
    return problems


def language_model_problems(params: Params) -> list[str]:
    """Captioning and VQA: prefix.lm is a local model, or a hub name while the hub may be reached."""
    if params.run.task not in VL_TASKS:
        return []
    from aape.prompts.local_source import resolve_model

    try:
        resolve_model(params.prefix.lm)
    except AAPEError as exc:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            return [f"prefix.lm: {exc}, and HF_HUB_OFFLINE=1 keeps the Hugging Face hub out of reach"]
    return []


def backbone_problems(params: Params) -> list[str]:
    from aape.backbone import backbone_problems as problems_of

    return problems_of(params.backbone)


def evaluation_problems(params: Params) -> list[str]:
    """Transfer datasets are known; every evaluation.shots_results pattern matches a file."""
    from aape.data.registry import canonical_name

    problems = []
    if params.run.task in IMAGE_TEXT_TASKS:
        problems = [p for name in params.evaluation.cross_datasets
                    for p in _image_text_dataset_problems(params, name, "evaluation.cross_datasets")]
    for key in ("cross_datasets", "domain_shift") if params.run.task not in IMAGE_TEXT_TASKS else ():
        for name in getattr(params.evaluation, key):
            try:
                canonical_name(name)
            except AAPEError as exc:
                problems.append(f"evaluation.{key}: {exc}")
                continue
            problems += _folder_problems(params, name, f"evaluation.{key}")
    problems += [f"evaluation.shots_results: no file matches {pattern!r}" for pattern in params.evaluation.shots_results if not glob.glob(pattern)]
    return problems


# (the stages that would fail on it, the check); a check runs when any of its stages will run.
# evaluate builds the backbone again for transfer datasets and predictions.
CHECKS: tuple[tuple[tuple[str, ...], Check], ...] = (
    (("prepare-data",), dataset_problems),
    (("generate-prompts",), prompt_problems),
    (("extract-features", "evaluate"), backbone_problems),
    (("evaluate",), evaluation_problems),
    (("train-baselines", "evaluate"), language_model_problems),
)


def preflight_problems(params: Params, stages: Iterable[str] | None = None) -> list[str]:
    """Every problem found for the given stages (all stages when None), one line each."""
    chosen = None if stages is None else set(stages)
    problems: list[str] = []
    for covered, check in CHECKS:
        if chosen is None or chosen & set(covered):
            problems += [" ".join(problem.split()) for problem in check(params)]  # one line per problem
    return problems


def preflight(params: Params, stages: Iterable[str] | None = None, source: str = "the configuration") -> None:
    """Raise ConfigError naming every problem, before anything runs."""
    problems = preflight_problems(params, stages)
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise ConfigError(f"{source} cannot run ({len(problems)} problem(s) found before starting):\n{listed}")
