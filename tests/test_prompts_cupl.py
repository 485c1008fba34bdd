"""Importing CuPL-style description files: tolerant class matching, unmatched reports, the stage."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import shared_asset

from aape.config import load_params
from aape.data.coop import EUROSAT_RENAMES
from aape.data.registry import class_renames
from aape.prompts import DESCRIPTION_COLUMNS, descriptions_by_class, load_descriptions
from aape.prompts.cupl import match_classes, read_cupl_file
from aape.prompts.errors import CuplFileError, TooFewDescriptionsError, UnmatchedClassesError
from aape.stages.generate_prompts import run

SPLIT_FOR = {"eurosat": "EuroSAT", "dtd": "DescribableTextures", "ucf101": "UCF101", "oxfordpets": "OxfordPets",
             "caltech101": "Caltech101", "flowers102": "OxfordFlowers", "stanfordcars": "StanfordCars"}  # fmt: skip


def coop_classnames(split_name: str) -> list[str]:
    """Class names by label, exactly as CoOp's split file spells them."""
    split = json.loads(shared_asset("coop_splits", f"split_zhou_{split_name}.json").read_text())
    names = {label: name for part in split.values() for _, label, name in part}
    return [names[i] for i in range(len(names))]


def cupl_params(tmp_path: Path, file: Path, *extra: str):
    return load_params(None, [f"run.output_dir={tmp_path / 'out'}", f"run.cache_dir={tmp_path / 'cache'}",
                              "prompts.source=cupl-json", f"prompts.file={file}", "tracking.enabled=false", *extra])  # fmt: skip


def write_classes(tmp_path: Path, dataset: str, classnames: list[str]) -> None:
    folder = tmp_path / "out" / "data"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.json").write_text(json.dumps({"dataset": dataset, "classnames": classnames}))


# matching --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cupl_name", list(SPLIT_FOR))
def test_real_cupl_files_match_every_coop_class(cupl_name):
    classnames = coop_classnames(SPLIT_FOR[cupl_name])
    tree = read_cupl_file(shared_asset("descriptors", "susx_cupl", f"CuPL_prompts_{cupl_name}.json"))
    match = match_classes(classnames, list(tree))
    assert match.unmatched == [] and match.unused_keys == []
    assert len(set(match.keys.values())) == len(classnames)  # one key per class, none shared


def test_keys_that_differ_from_coop_names_are_matched_tolerantly():
    ucf = coop_classnames("UCF101")
    tree = read_cupl_file(shared_asset("descriptors", "susx_cupl", "CuPL_prompts_ucf101.json"))
    match = match_classes(ucf, list(tree))
    assert ucf[0] == "Apply_Eye_Makeup" and match.keys[0] == "Apply Eye Makeup"
    pets = coop_classnames("OxfordPets")
    match = match_classes(pets, list(read_cupl_file(shared_asset("descriptors", "susx_cupl", "CuPL_prompts_oxfordpets.json"))))
    assert pets[1] == "american_bulldog" and match.keys[1] == "american bulldog"


def test_matching_rules():
    keys = ["Annual Crop Land", "sea or lake", "Herbaceous  Vegetation", "river"]
    match = match_classes(["annual_crop_land", "Sea Or Lake", "HerbaceousVegetation", "River", "Forest"], keys)
    assert match.keys == {0: "Annual Crop Land", 1: "sea or lake", 2: "Herbaceous  Vegetation", 3: "river"}
    assert match.unmatched == [4] and match.unused_keys == []


def test_dataset_renames_match_folder_names_to_coop_names_both_ways():
    keys = ["Annual Crop Land", "SeaLake", "Forest", "airplanes"]
    classes = ["AnnualCrop", "Sea or Lake", "Forest"]
    assert match_classes(classes, keys).unmatched == [0, 1]  # normalising alone cannot see these
    match = match_classes(classes, keys, renames=class_renames("EuroSAT"))
    assert match.keys == {0: "Annual Crop Land", 1: "SeaLake", 2: "Forest"} and match.unmatched == []
    assert match_classes(["airplane"], keys, renames=class_renames("caltech101")).keys == {0: "airplanes"}
    assert class_renames("demo-mnist") == {} and class_renames("my-own-folder") == {}


def test_real_eurosat_file_matches_the_folder_names():
    tree = read_cupl_file(shared_asset("descriptors", "susx_cupl", "CuPL_prompts_eurosat.json"))
    match = match_classes(list(EUROSAT_RENAMES), list(tree), renames=class_renames("eurosat"))
    assert match.keys == dict(enumerate(EUROSAT_RENAMES.values())) and match.unused_keys == []


def test_ambiguous_keys_are_an_error():
    with pytest.raises(CuplFileError, match="several keys"):
        match_classes(["sea lake"], ["Sea Lake", "sea_lake"])


@pytest.mark.parametrize(
    "content, message",
    [("{oops", "not valid JSON"), ("[]", "non-empty JSON object"), ('{"forest": "a wood"}', "key 'forest'"),
     ('{"forest": ["ok", 3]}', "key 'forest'")],
)  # fmt: skip
def test_malformed_files_name_the_problem(tmp_path: Path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CuplFileError, match=message):
        read_cupl_file(path)
    with pytest.raises(CuplFileError, match="not found"):
        read_cupl_file(tmp_path / "missing.json")


# the stage -------------------------------------------------------------------------------------------
def test_stage_imports_a_real_file_for_every_class(tmp_path: Path):
    classnames = coop_classnames("EuroSAT")
    write_classes(tmp_path, "eurosat", classnames)
    source = shared_asset("descriptors", "susx_cupl", "CuPL_prompts_eurosat.json")
    tree = json.loads(source.read_text())
    out = run(cupl_params(tmp_path, source))
    path = tmp_path / "out" / "prompts" / "descriptions.parquet"
    assert str(path) in out["outputs"] and tuple(pq.read_schema(path).names) == DESCRIPTION_COLUMNS
    frame = load_descriptions(path)
    grouped = descriptions_by_class(frame, num_classes=10)
    for index, name in enumerate(classnames):
        unique = list(dict.fromkeys(" ".join(s.split()) for s in tree[name] if s.strip()))
        assert grouped[index] == unique, name  # every sentence, in file order, exact duplicates dropped
    assert set(frame["source"]) == {"cupl-json:CuPL_prompts_eurosat.json"}
    assert frame["temperature"].isna().all() and frame["request_id"].isna().all()
    first = frame.iloc[0]
    assert first["raw_text"] == tree[classnames[0]][first["sample_index"]]
    summary = json.loads((tmp_path / "out" / "prompts" / "summary.json").read_text())
    assert summary["descriptions"] == len(frame) == out["descriptions"]
    assert summary["unmatched_classes"] == [] and summary["requests"]["sent"] == 0
    assert summary["descriptions_per_class"]["Forest"] == len(grouped[1])


def test_unmatched_classes_fail_the_stage_unless_allowed(tmp_path: Path):
    file = tmp_path / "cupl.json"
    file.write_text(json.dumps({"Forest": ["Tall trees.", "A green canopy."], "River": ["A blue ribbon."]}))
    write_classes(tmp_path, "eurosat", ["forest", "Sea_Lake", "river"])
    with pytest.raises(UnmatchedClassesError) as err:
        run(cupl_params(tmp_path, file))
    assert "class 1 'Sea_Lake'" in str(err.value) and "allow_unmatched" in str(err.value)
    assert not (tmp_path / "out" / "prompts" / "descriptions.parquet").exists()

    run(cupl_params(tmp_path, file, "prompts.allow_unmatched=true"))
    frame = load_descriptions(tmp_path / "out" / "prompts" / "descriptions.parquet")
    assert descriptions_by_class(frame, num_classes=3) == {0: ["Tall trees.", "A green canopy."], 1: ["a photo of a Sea Lake."], 2: ["A blue ribbon."]}
    assert frame.loc[frame["class_index"] == 1, "source"].tolist() == ["fallback"]
    summary = json.loads((tmp_path / "out" / "prompts" / "summary.json").read_text())
    assert summary["unmatched_classes"] == ["Sea_Lake"] and summary["matched_keys"] == {"forest": "Forest", "river": "River"}


def test_min_per_class_counts_after_cleaning(tmp_path: Path):
    file = tmp_path / "cupl.json"
    file.write_text(json.dumps({"Forest": ["Tall trees.", "A green canopy."], "River": ["A blue ribbon.", "A blue ribbon.", "  "]}))
    write_classes(tmp_path, "eurosat", ["Forest", "River"])
    with pytest.raises(TooFewDescriptionsError, match=r"'River' \(class 1: 1\)") as err:
        run(cupl_params(tmp_path, file, "prompts.min_per_class=2"))
    assert f"Add descriptions for those classes to {file}" in str(err.value) and "n_per_template" not in str(err.value)


def test_stage_matches_through_the_dataset_renames(tmp_path: Path):
    file = tmp_path / "cupl.json"
    file.write_text(json.dumps({"Annual Crop Land": ["Rows of wheat."], "Forest": ["Tall trees."]}))
    write_classes(tmp_path, "eurosat", ["AnnualCrop", "Forest"])
    run(cupl_params(tmp_path, file))
    frame = load_descriptions(tmp_path / "out" / "prompts" / "descriptions.parquet")
    assert descriptions_by_class(frame, num_classes=2) == {0: ["Rows of wheat."], 1: ["Tall trees."]}
    summary = json.loads((tmp_path / "out" / "prompts" / "summary.json").read_text())
    assert summary["matched_keys"] == {"AnnualCrop": "Annual Crop Land"}


@pytest.mark.parametrize("empty", [[], ["  ", ""]])
def test_a_class_with_an_empty_list_is_unmatched_and_can_be_allowed(tmp_path: Path, empty):
    file = tmp_path / "cupl.json"
    file.write_text(json.dumps({"Forest": empty, "River": ["A blue ribbon."]}))
    write_classes(tmp_path, "eurosat", ["Forest", "River"])
    with pytest.raises(UnmatchedClassesError) as err:
        run(cupl_params(tmp_path, file))
    message = str(err.value)
    assert "1 of 2 classes" in message and "class 0 'Forest': key 'Forest' has no usable description" in message
    assert f"Add descriptions for those classes to {file}" in message and "prompts.allow_unmatched: true" in message
    assert "n_per_template" not in message

    run(cupl_params(tmp_path, file, "prompts.allow_unmatched=true"))
    frame = load_descriptions(tmp_path / "out" / "prompts" / "descriptions.parquet")
    assert descriptions_by_class(frame, num_classes=2) == {0: ["a photo of a Forest."], 1: ["A blue ribbon."]}
    summary = json.loads((tmp_path / "out" / "prompts" / "summary.json").read_text())
    assert summary["unmatched_classes"] == ["Forest"] and summary["empty_file_keys"] == {"Forest": "Forest"}
    assert summary["unused_file_keys"] == []


def test_keys_matching_no_class_are_logged(tmp_path: Path, caplog):
    extra = [f"extra {i:02d}" for i in range(12)]
    file = tmp_path / "cupl.json"
    file.write_text(json.dumps({"Forest": ["Tall trees."], **{k: ["x y z."] for k in extra}}))
    write_classes(tmp_path, "eurosat", ["Forest"])
    with caplog.at_level(logging.WARNING, logger="aape.prompts.cupl"):
        run(cupl_params(tmp_path, file))
    [warning] = [r.getMessage() for r in caplog.records if "match no class" in r.getMessage()]
    assert warning.startswith(f"12 key(s) of {file} match no class")
    assert all(repr(k) in warning for k in extra[:10]) and "'extra 10'" not in warning and warning.endswith("and 2 more")
    summary = json.loads((tmp_path / "out" / "prompts" / "summary.json").read_text())
    assert summary["unused_file_keys"] == extra
