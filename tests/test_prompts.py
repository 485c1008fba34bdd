"""Prompt stage building blocks: templates, cleaning, the journal, request keys, the table, class lists."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from aape.config import ConfigError, load_params
from aape.data.demo import DEMO_KEY
from aape.data.registry import FEWSHOT_DATASETS
from aape.prompts import DESCRIPTION_COLUMNS, descriptions_by_class, load_descriptions
from aape.prompts.answers import Sampling
from aape.prompts.cleaning import clean_answers, clean_text, is_refusal
from aape.prompts.errors import PromptsError, TemplateError, TooFewDescriptionsError
from aape.data.manifests import ClassesManifestError, ClassNames
from aape.prompts.generate import check_min_per_class, plan_jobs
from aape.prompts.journal import Journal, request_key
from aape.prompts.table import write_descriptions
from aape.prompts.templates import GENERIC, available_template_sets, display_name, load_template_file, select_templates


# templates -------------------------------------------------------------------------------------------
def test_every_dataset_has_2_to_9_prompts_with_one_class_slot():
    system, sets, _ = load_template_file()
    assert set(FEWSHOT_DATASETS) | {DEMO_KEY, GENERIC} <= set(sets)  # a set of its own for every benchmark dataset
    assert system.strip()
    for name, prompts in sets.items():
        assert 2 <= len(prompts) <= 9, name
        assert all(p.count("{}") == 1 for p in prompts), name
        assert len(set(prompts)) == len(prompts), f"{name} repeats a prompt"


def test_prompts_are_fitted_to_the_domain():
    assert all("satellite" in p or "aerial" in p or "overhead" in p or "above" in p for p in select_templates("eurosat", "x").prompts)
    assert all(any(w in p for w in ("texture", "surface", "pattern")) for p in select_templates("dtd", "x").prompts)
    assert all(any(w in p for w in ("doing", "performing", "during")) for p in select_templates("ucf101", "x").prompts)


@pytest.mark.parametrize(
    "dataset, expected",
    [("eurosat", "eurosat"), ("EuroSAT", "eurosat"), ("DescribableTextures", "dtd"), ("oxford_pets", "oxford_pets"),
     ("OxfordPets", "oxford_pets"), ("Flowers102", "oxford_flowers"), ("imagenet_sketch", "imagenet"),
     ("demo-mnist", "demo-mnist"), ("my-own-folder-of-birds", GENERIC),
     # spellings only the data registry knows, and aliases only templates.yaml knows (custom names)
     ("FGVCAircraft", "fgvc_aircraft"), ("Stanford Cars", "stanford_cars"), ("imagenet-r", "imagenet"),
     ("caltech", "caltech101"), ("Textures", "dtd"), ("digits", "demo-mnist"), ("manifest", GENERIC)],
)  # fmt: skip
def test_auto_picks_the_set_by_dataset_name(dataset, expected):
    assert select_templates("auto", dataset).name == expected


def test_template_names_are_matched_as_the_data_registry_matches_dataset_names(tmp_path):
    """'cars' and 'stanford_cars' are one dataset to the registry, so two sets under them clash;
    names the registry does not know ('my_birds', 'My-Birds') still match each other."""
    prompts = "    prompts: ['a {} seen closely.', 'the {} in its setting.']\n"
    clash = tmp_path / "clash.yaml"
    clash.write_text("system: s\ndatasets:\n  generic:\n" + prompts + "  stanford_cars:\n" + prompts + "  cars:\n" + prompts)
    with pytest.raises(TemplateError, match="the name or alias 'cars' is used by both 'stanford_cars' and 'cars'"):
        load_template_file(clash)
    custom = tmp_path / "custom.yaml"
    custom.write_text("system: s\ndatasets:\n  generic:\n" + prompts + "  my_birds:\n    aliases: [songbirds]\n" + prompts)
    _, sets, names = load_template_file(custom)
    assert names == {"generic": "generic", "mybirds": "my_birds", "songbirds": "my_birds"} and set(sets) == {"generic", "my_birds"}


def test_explicit_choice_and_max_templates():
    chosen = select_templates("food101", "eurosat", max_templates=2)
    assert chosen.name == "food101"
    assert chosen.prompts == load_template_file()[1]["food101"][:2]


def test_unknown_template_set_names_the_choices():
    with pytest.raises(TemplateError) as err:
        select_templates("klingon", "eurosat")
    assert "klingon" in str(err.value) and "eurosat" in str(err.value) and "auto" in str(err.value)
    assert "generic" in available_template_sets()


def test_class_names_read_naturally_in_questions():
    assert display_name("Apply_Eye_Makeup") == "Apply Eye Makeup"
    chosen = select_templates("auto", "ucf101")
    assert chosen.question(chosen.prompts[0], "Apply_Eye_Makeup") == chosen.prompts[0].replace("{}", "Apply Eye Makeup")


# cleaning --------------------------------------------------------------------------------------------
def test_clean_text_trims_markers_quotes_and_whitespace():
    assert clean_text('  "A  green\n field."  ') == "A green field."
    assert clean_text("1. A river bend.") == "A river bend."
    assert clean_text("- A river bend.") == "A river bend."
    assert clean_text("   \n ") == ""


def test_truncated_answer_is_cut_after_its_last_full_sentence():
    raw = "A forest seen from above is a dense green carpet. Small clearings and roads cro"
    assert clean_text(raw, truncated=True) == "A forest seen from above is a dense green carpet."
    assert clean_text(raw, truncated=True, trim_truncated=False) == raw
    assert clean_text(raw, truncated=False) == raw
    assert clean_text("Too short. and cut", truncated=True) == "Too short. and cut"  # nothing useful left to cut to


def test_refusals_are_recognised():
    assert is_refusal("I'm sorry, but I can't describe that.")
    assert is_refusal("As an AI language model, I cannot see images.")
    assert not is_refusal("A sorry-looking wet dog with drooping ears.")


def test_clean_answers_drops_empty_refusals_and_exact_duplicates_keeping_the_first():
    raw = [("A red barn.", False), ("", False), ("  ", False), ("I cannot help with that.", False),
           ("A red barn.", False), (" A red barn. ", False), ("A red  barn!", False)]  # fmt: skip
    result = clean_answers(raw)
    assert result.kept == [(0, "A red barn."), (6, "A red barn!")]
    assert result.dropped == {"empty": 2, "refusal": 1, "duplicate": 2}


# request keys and the journal ------------------------------------------------------------------------
BASE_KEY = dict(source="openai", model="m", endpoint="e", system="s", template="t {}", question="t x", class_name="x",
                sample_index=0, temperature=0.99, max_tokens=50)  # fmt: skip


@pytest.mark.parametrize(
    "field, other", [("model", "m2"), ("endpoint", "e2"), ("system", "s2"), ("template", "u {}"), ("question", "t y"),
                     ("class_name", "y"), ("sample_index", 1), ("temperature", 0.5), ("max_tokens", 40), ("source", "local")],
)  # fmt: skip
def test_request_key_changes_with_everything_that_changes_the_answer(field, other):
    assert request_key(**BASE_KEY) == request_key(**dict(reversed(list(BASE_KEY.items()))))
    assert request_key(**{**BASE_KEY, field: other}) != request_key(**BASE_KEY)


def test_more_samples_per_template_only_add_jobs():
    classes = ClassNames("eurosat", ["Forest", "River"])
    templates = select_templates("auto", "eurosat", max_templates=2)
    identity = {"source": "local", "model": "m"}
    small = plan_jobs(classes, templates, 2, Sampling(0.99, 50), identity)
    large = plan_jobs(classes, templates, 5, Sampling(0.99, 50), identity)
    assert len(small) == 2 * 2 * 2 and len(large) == 2 * 2 * 5
    assert {j.key for j in small} < {j.key for j in large}
    assert len({j.key for j in large}) == len(large)
    assert [(j.class_index, j.template, j.sample_index) for j in small][:3] == [
        (0, templates.prompts[0], 0), (0, templates.prompts[0], 1), (0, templates.prompts[1], 0)]  # fmt: skip


def test_journal_round_trip_first_entry_wins(tmp_path: Path):
    journal = Journal(tmp_path / "j" / "journal.jsonl")
    with journal:
        journal.append([{"key": "a", "raw_text": "one"}, {"key": "b", "raw_text": "two"}])
        journal.append([{"key": "a", "raw_text": "again"}])
    assert Journal(journal.path).load() == {"a": {"key": "a", "raw_text": "one"}, "b": {"key": "b", "raw_text": "two"}}


def test_journal_survives_a_line_cut_short_by_a_kill(tmp_path: Path, caplog):
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'{"key": "a", "raw_text": "kept"}\n{"key": "b", "raw_te')
    journal = Journal(path)
    assert set(journal.load()) == {"a"}
    assert "unreadable" in caplog.text
    with journal:
        journal.append([{"key": "c", "raw_text": "after the crash"}])
    assert set(Journal(path).load()) == {"a", "c"}


# the table -------------------------------------------------------------------------------------------
def _row(index: int, text: str) -> dict:
    return {"dataset": "d", "class_index": index, "class_name": f"c{index}", "template": "t {}", "text": text, "raw_text": text,
            "source": "local:m", "temperature": 0.99, "sample_index": 0, "request_id": "r", "prompt_tokens": 3,
            "completion_tokens": 4, "created_at": datetime(2024, 1, 1, tzinfo=timezone.utc)}  # fmt: skip


def test_descriptions_table_has_exactly_the_contract_columns(tmp_path: Path):
    path = tmp_path / "descriptions.parquet"
    write_descriptions([_row(0, "a"), _row(1, "b"), _row(0, "c")], path)
    assert tuple(pq.read_schema(path).names) == DESCRIPTION_COLUMNS == (
        "dataset", "class_index", "class_name", "template", "text", "raw_text", "source", "temperature",
        "sample_index", "request_id", "prompt_tokens", "completion_tokens", "created_at")  # fmt: skip
    frame = load_descriptions(path)
    assert descriptions_by_class(frame) == {0: ["a", "c"], 1: ["b"]}
    assert descriptions_by_class(path, num_classes=2) == {0: ["a", "c"], 1: ["b"]}
    with pytest.raises(PromptsError, match=r"class indices \[2\]"):
        descriptions_by_class(frame, num_classes=3)
    assert not list(tmp_path.glob(".*tmp")), "the temporary file of the atomic write was left behind"


def test_load_descriptions_rejects_missing_and_foreign_files(tmp_path: Path):
    with pytest.raises(PromptsError, match="generate-prompts"):
        load_descriptions(tmp_path / "nope.parquet")
    pd.DataFrame({"text": ["x"]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(PromptsError, match="lacks the columns"):
        load_descriptions(tmp_path / "other.parquet")


# class lists and checks ------------------------------------------------------------------------------
def test_generate_prompts_reads_the_class_names_that_prepare_data_wrote(tmp_path: Path):
    path = tmp_path / "classes.json"
    with pytest.raises(ClassesManifestError, match="prepare-data"):
        ClassNames.read(path)
    path.write_text("{not json")
    with pytest.raises(ClassesManifestError, match=str(path)):
        ClassNames.read(path)
    path.write_text(json.dumps({"dataset": "eurosat", "classnames": ["Forest", ""]}))
    with pytest.raises(ClassesManifestError, match="classnames"):
        ClassNames.read(path)
    path.write_text(json.dumps({"dataset": "eurosat", "classnames": ["Forest", "River"], "protocol": "base2new"}))
    assert ClassNames.read(path) == ClassNames("eurosat", ["Forest", "River"])


def test_too_few_descriptions_names_the_class():
    classes = ClassNames("eurosat", ["Forest", "River", "Sea"])
    check_min_per_class(classes, [3, 3, 3], 3, {})
    with pytest.raises(TooFewDescriptionsError) as err:
        check_min_per_class(classes, [3, 1, 3], 2, {"refusal": 2})
    message = str(err.value)
    assert "'River' (class 1: 1)" in message and "Forest" not in message and "n_per_template" in message


def test_new_config_keys_validate():
    params = load_params(None, ["prompts.openai.backoff_s=0.1", "prompts.trim_truncated=false"])
    assert params.prompts.openai.backoff_s == 0.1 and params.prompts.trim_truncated is False
    with pytest.raises(ConfigError, match="backoff_s"):
        load_params(None, ["prompts.openai.backoff_s=0"])
