"""The zero-shot baselines' templates: CoOp's hand-written one and CLIP's published set, per dataset."""

import pytest

from aape.config import FeaturesConfig
from aape.data import KNOWN_DATASETS
from aape.features.baseline_templates import baseline_templates, load_template_table

# CoOp trainers/zsclip.py CUSTOM_TEMPLATES, under the project's dataset keys
COOP_TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}
# sizes of CLIP's sets (data/prompts.md; the ImageNet notebook for ImageNet and its variants)
CLIP_SET_SIZES = {
    "imagenet": 80, "imagenet_a": 80, "imagenet_r": 80, "imagenetv2": 80, "imagenet_sketch": 80,
    "caltech101": 34, "oxford_pets": 1, "stanford_cars": 8, "oxford_flowers": 1, "food101": 1,
    "fgvc_aircraft": 2, "sun397": 2, "dtd": 8, "eurosat": 3, "ucf101": 48, "cifar10": 18, "cifar100": 18,
    "demo-mnist": 1, "folder": 80, "manifest": 80,
}

AUTO = FeaturesConfig()


def test_every_known_dataset_has_templates_and_every_template_has_one_slot():
    table = load_template_table()
    assert set(table.datasets) == set(KNOWN_DATASETS)
    for name, templates in table.ensembles.items():
        assert templates and all(t.count("{}") == 1 for t in templates), name
        assert len(set(templates)) == len(templates), name
    for key in KNOWN_DATASETS:
        chosen = baseline_templates(AUTO, key)
        assert chosen.zeroshot.count("{}") == 1 and chosen.dataset == key
        assert len(chosen.ensemble) == CLIP_SET_SIZES[key], key


@pytest.mark.parametrize(("dataset", "template"), sorted(COOP_TEMPLATES.items()))
def test_zeroshot_template_is_coops(dataset, template):
    chosen = baseline_templates(AUTO, dataset)
    assert chosen.zeroshot == template
    assert chosen.zeroshot_source.startswith("CoOp trainers/zsclip.py CUSTOM_TEMPLATES[")


def test_concrete_sets_and_their_sources():
    eurosat = baseline_templates(AUTO, "EuroSAT")  # CoOp's and torchvision's spellings work too
    assert eurosat.zeroshot == "a centered satellite photo of {}."
    assert eurosat.ensemble == ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                                "a centered satellite photo of the {}.")
    assert eurosat.ensemble_source == "CLIP data/prompts.md, EuroSAT (3 templates)"
    imagenet = baseline_templates(AUTO, "imagenet")
    assert len(imagenet.ensemble) == 80 and imagenet.ensemble[0] == "a bad photo of a {}."
    assert imagenet.ensemble[-1] == "a tattoo of the {}." and "itap of a {}." in imagenet.ensemble
    assert imagenet.ensemble_source == "CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb (80 templates)"
    assert baseline_templates(AUTO, "imagenet-r").ensemble == imagenet.ensemble  # CLIP used it for the variants
    assert baseline_templates(AUTO, "DescribableTextures").zeroshot == "{} texture."
    assert baseline_templates(AUTO, "Flowers102").ensemble == ("a photo of a {}, a type of flower.",)
    ucf = baseline_templates(AUTO, "ucf101").ensemble
    assert ucf[0] == "a photo of a person {}." and ucf[-1] == "a demonstration of the person practicing {}."


def test_datasets_coop_does_not_cover_use_stated_fallbacks():
    mnist = baseline_templates(AUTO, "demo-mnist")
    assert mnist.zeroshot == "a photo of a {}." and "CoOp has no template for demo-mnist" in mnist.zeroshot_source
    assert mnist.ensemble == ('a photo of the number: "{}".',)  # CLIP's MNIST set
    for user in ("folder", "manifest"):
        assert baseline_templates(AUTO, user).ensemble == baseline_templates(AUTO, "imagenet").ensemble
    assert len(baseline_templates(AUTO, "cifar10").ensemble) == 18


def test_explicit_settings_replace_the_table():
    cfg = FeaturesConfig(zeroshot_template="itap of a {}.", ensemble_templates=["a {}.", "the {}."])
    chosen = baseline_templates(cfg, "eurosat")
    assert chosen.zeroshot == "itap of a {}." and chosen.zeroshot_source == "features.zeroshot_template"
    assert chosen.ensemble == ("a {}.", "the {}.") and chosen.ensemble_source == "features.ensemble_templates (2 templates)"
    # each setting on its own: the other still comes from the table
    half = baseline_templates(FeaturesConfig(ensemble_templates=["a {}."]), "eurosat")
    assert half.zeroshot == "a centered satellite photo of {}." and half.ensemble == ("a {}.",)
    assert half.metadata()["ensemble_templates"] == ["a {}."]


@pytest.mark.parametrize("spelling", ["Oxford_Pets", "oxford-pets", "OxfordPets", " oxford pets ", "pets"])
def test_every_spelling_of_a_dataset_reaches_the_registrys_key(spelling):
    """The templates take the registry's normaliser (canonical_name) with every spelling it knows."""
    assert baseline_templates(AUTO, spelling).dataset == "oxford_pets"
