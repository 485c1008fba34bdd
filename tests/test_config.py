"""params.yaml is the single, validated source of settings."""

from pathlib import Path

import pytest

from aape.config import ConfigError, Params, ScheduleConfig, load_params

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
    assert params.aggregator.schedule.lr == 0.002  # the other section keeps its default


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


def test_flat_and_fingerprint():
    a, b = Params(), load_params(None, ["data.shots=4"])
    assert a.flat()["data.shots"] == 16
    assert a.fingerprint("backbone") == b.fingerprint("backbone")
    assert a.fingerprint("data") != b.fingerprint("data")


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
