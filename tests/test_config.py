"""params.yaml is the single, validated source of settings."""

from pathlib import Path

import pytest

from aape.config import OPTIMISER_PRESETS, ConfigError, Params, ScheduleConfig, load_params

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_file_is_valid_and_complete():
    params = load_params(REPO / "params.yaml")
    # params.yaml spells out every key, so a user sees each setting without reading code
    import yaml

    written = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(written) == set(Params.model_fields)
    for section, fields in Params.model_fields.items():
        assert set(written[section]) == set(fields.annotation.model_fields), section
    assert params.data.dataset == "demo-mnist"


def test_unknown_key_is_named_with_the_allowed_keys(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data:\n  shot: 4\n")
    with pytest.raises(ConfigError) as err:
        load_params(bad)
    message = str(err.value)
    assert "data.shot" in message and "shots" in message and str(bad) in message


def test_bad_value_is_named_with_the_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_params(None, ["aggregator.variant=transformer"])
    message = str(err.value)
    assert "aggregator.variant" in message and "'transformer'" in message
    for allowed in ("attention", "literal", "mean", "mlp", "random"):
        assert allowed in message


def test_out_of_range_number_is_rejected():
    with pytest.raises(ConfigError, match="data.shots"):
        load_params(None, ["data.shots=0"])


def test_overrides_reach_any_key_and_parse_yaml_values():
    params = load_params(None, ["run.seeds=[4, 5]", "generator.lambda_distill=3", "generator.schedule.lr=0.01"])
    assert params.run.seeds == [4, 5]
    assert params.generator.lambda_distill == 3.0
    assert params.generator.schedule.lr == 0.01
    assert params.aggregator.schedule.lr == Params().aggregator.schedule.lr  # the other section keeps its default


def test_malformed_override_says_how_to_write_it():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_params(None, ["data.shots"])


def test_missing_params_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_cupl_json_source_needs_a_file():
    with pytest.raises(ConfigError, match="prompts.file"):
        load_params(None, ["prompts.source=cupl-json"])


def test_paper_defaults_when_nothing_is_set():
    params = Params()
    assert (params.backbone.model, params.backbone.pretrained) == ("ViT-B-16", "openai")
    assert params.generator.hidden == 32 and params.generator.head == "bottleneck"
    assert params.generator.lambda_distill == 5.0
    assert params.aggregator.reward_scale == 2.5 and params.aggregator.variant == "attention"
    assert params.run.seeds == [1, 2, 3] and params.data.shots == 16


@pytest.mark.parametrize(
    ("shots", "dataset", "epochs"),
    [(16, "eurosat", 200), (8, "dtd", 200), (4, "dtd", 100), (2, "dtd", 100), (1, "dtd", 50), (16, "imagenet", 50)],
)
def test_coop_schedule_epochs(shots, dataset, epochs):
    assert ScheduleConfig().resolved_epochs(shots, dataset) == epochs


@pytest.mark.parametrize("spelling", ["imagenet", "ImageNet", "IMAGENET", "imagenet1k", "ImageNet-1k", "image_net"])
def test_every_imagenet_spelling_gets_coops_50_epochs_through_the_recorded_name(spelling):
    # the stages pass the canonical key prepare-data records in classes.json, never the raw string
    from aape.data.registry import canonical_name

    try:
        key = canonical_name(spelling)
    except Exception:  # a spelling the registry refuses never reaches training
        pytest.skip(f"{spelling!r} is not an accepted dataset name")
    assert key == "imagenet"
    assert ScheduleConfig().resolved_epochs(16, key) == 50


def test_optimiser_presets_per_stage_and_explicit_keys_override_them():
    params = Params()
    agg, gen = params.aggregator.schedule, params.generator.schedule
    assert (agg.preset, agg.optimizer, agg.lr) == ("aape-aggregator", "adamw", OPTIMISER_PRESETS["aape-aggregator"]["lr"])
    assert (gen.preset, gen.optimizer, gen.lr) == ("aape-generator", "adamw", OPTIMISER_PRESETS["aape-generator"]["lr"])
    coop = load_params(None, ["generator.schedule.preset=coop"]).generator.schedule
    assert (coop.optimizer, coop.lr, coop.momentum, coop.weight_decay) == ("sgd", 0.002, 0.9, 5e-4)
    mixed = load_params(None, ["aggregator.schedule.preset=coop", "aggregator.schedule.lr=0.01"]).aggregator.schedule
    assert (mixed.optimizer, mixed.lr) == ("sgd", 0.01)
    with pytest.raises(ConfigError, match="unknown optimiser preset 'adam'.*coop"):
        load_params(None, ["generator.schedule.preset=adam"])
    with pytest.raises(ConfigError, match="select"):
        load_params(None, ["generator.schedule.select=best"])


def test_flat_has_one_dotted_key_per_setting():
    a, b = Params(), load_params(None, ["data.shots=4"])
    assert a.flat()["data.shots"] == 16 and b.flat()["data.shots"] == 4


def test_readme_documents_every_configuration_key():
    readme = (REPO / "README.md").read_text()
    missing = []
    for dotted in Params().flat():
        section, *rest = dotted.split(".")
        leaf = rest[-1]
        # keys are listed either in full or as a leaf of a `section.*` / `section.sub.*` row
        if dotted not in readme and f"`{leaf}`" not in readme:
            missing.append(dotted)
    assert not missing, f"README's configuration reference lacks: {missing}"


def test_baseline_templates_default_to_auto_and_accept_explicit_values():
    params = Params()
    assert params.features.class_template == "a photo of a {}."  # AAPE's prompt does not follow the dataset
    assert params.features.zeroshot_template == "auto" and params.features.ensemble_templates == "auto"
    explicit = load_params(None, ["features.zeroshot_template='{} texture.'", "features.ensemble_templates=['a {}.', 'the {}.']"])
    assert explicit.features.zeroshot_template == "{} texture."
    assert explicit.features.ensemble_templates == ["a {}.", "the {}."]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("features.zeroshot_template='a photo'", r"features.zeroshot_template.*'auto'.*must contain '\{\}' exactly once"),
        ("features.zeroshot_template='a {} and a {}'", r"features.zeroshot_template.*exactly once"),
        ("features.zeroshot_template='a {x} of {}'", r"features.zeroshot_template.*braces other than"),
        ("features.ensemble_templates=imagenet", r"features.ensemble_templates.*'auto'.*or a list of templates"),
        ("features.ensemble_templates=[]", r"features.ensemble_templates.*is empty"),
        ("features.ensemble_templates=['a {}.', 'a photo']", r"features.ensemble_templates.*template 1 \('a photo'\) must contain"),
        ("features.ensemble_templates=['a {}.', 'a {}.']", r"features.ensemble_templates.*template 1 \('a \{\}.'\) repeats template 0"),
        ("features.class_template='a photo'", r"features.class_template.*must contain '\{\}'"),
    ],
)
def test_bad_templates_are_named_with_what_is_wrong(override, message):
    with pytest.raises(ConfigError, match=message):
        load_params(None, [override])


def test_linear_probe_search_settings():
    evaluation = Params().evaluation
    assert evaluation.linear_probe_c_range == [1e-6, 1e6]
    assert (evaluation.linear_probe_c_coarse_points, evaluation.linear_probe_c_refine_steps) == (13, 4)
    with pytest.raises(ConfigError, match=r"evaluation.linear_probe_c_range.*0 < low < high"):
        load_params(None, ["evaluation.linear_probe_c_range=[10, 1]"])
    with pytest.raises(ConfigError, match=r"evaluation.linear_probe_c_range.*0 < low < high"):
        load_params(None, ["evaluation.linear_probe_c_range=[1]"])
    with pytest.raises(ConfigError, match="evaluation.linear_probe_c_coarse_points"):
        load_params(None, ["evaluation.linear_probe_c_coarse_points=1"])
    # the old grid key is gone; the message lists the keys that replace it
    with pytest.raises(ConfigError, match=r"unknown key 'evaluation.linear_probe_c_grid'.*linear_probe_c_range"):
        load_params(None, ["evaluation.linear_probe_c_grid=[1.0]"])
