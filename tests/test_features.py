"""Frozen-feature extraction and its cache: correct values, no repeated work, safe partial writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from aape.data.images import UnreadableImageError, open_image
from aape.data.manifests import ClassesManifest, ClassesManifestError
from aape.features import FeatureError, image_features, load_bundle, text_features
from aape.features import bundle as bundle_mod
from aape.features.cache import CacheEntry
from aape.features.image_encoder import CLEAN, view_entry
from aape.features.text_encoder import class_template_features
from aape.layout import Layout
from aape.stages import extract_features

from conftest import shared_asset

CLASSNAMES = ["apple", "boat", "cloud"]


# fixtures and helpers -------------------------------------------------------------------------


def _write_image(path: Path, seed: int, size: tuple[int, int] = (40, 36)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _manifest(paths: list[str]) -> pd.DataFrame:
    labels = [CLASSNAMES.index(p.split("/")[0]) for p in paths]
    return pd.DataFrame({"path": paths, "label": labels, "classname": [CLASSNAMES[i] for i in labels]})


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Five PNGs per class under <tmp>/images/<class>/."""
    root = tmp_path / "images"
    for c, name in enumerate(CLASSNAMES):
        for i in range(5):
            _write_image(root / name / f"{i}.png", seed=10 * c + i, size=(40 + i, 36))
    return root


def _rel_paths(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))


@pytest.fixture
def run_params(tiny_params, image_dir: Path):
    """A prepared run (classes.json, manifests, descriptions) for the tiny backbone, seeds [1]."""
    layout = Layout.from_params(tiny_params)
    layout.data.mkdir(parents=True)
    everything = list(range(len(CLASSNAMES)))
    ClassesManifest(dataset="toy", image_root=str(image_dir), classnames=CLASSNAMES, protocol="fewshot", train_classes=everything,
                    eval_sets={"all": everything}, split_hash="0", seeds=[1], shots=2).write(layout.classes_file)  # fmt: skip
    paths = _rel_paths(image_dir)
    _manifest([p for p in paths if p.split("/")[1] in ("3.png", "4.png")]).to_parquet(layout.split_manifest("test"))
    for split, names in (("train", ("0.png", "1.png")), ("val", ("2.png",))):
        target = layout.fewshot_manifest(1, split)
        target.parent.mkdir(parents=True, exist_ok=True)
        _manifest([p for p in paths if p.split("/")[1] in names]).to_parquet(target)
    layout.prompts.mkdir(parents=True)
    texts = [(2, "white and fluffy in the sky"), (0, "a round red fruit"), (1, "floats on water"), (0, "grows on trees")]
    pd.DataFrame(
        {"dataset": "toy", "class_index": [c for c, _ in texts], "class_name": [CLASSNAMES[c] for c, _ in texts], "text": [t for _, t in texts]}
    ).to_parquet(layout.descriptions)
    return tiny_params


class EncodeCounter:
    """Wraps the backbone's encoders and counts images and texts that go through them."""

    def __init__(self, backbone, monkeypatch) -> None:
        self.images = 0
        self.texts = 0
        encode_images, encode_texts = backbone.encode_images, backbone.encode_texts

        def counting_images(pixels):
            self.images += len(pixels)
            return encode_images(pixels)

        def counting_texts(texts):
            self.texts += len(texts)
            return encode_texts(texts)

        monkeypatch.setattr(backbone, "encode_images", counting_images)
        monkeypatch.setattr(backbone, "encode_texts", counting_texts)

    def reset(self) -> None:
        self.images = self.texts = 0


@pytest.fixture
def counter(tiny_backbone, monkeypatch) -> EncodeCounter:
    return EncodeCounter(tiny_backbone, monkeypatch)


@pytest.fixture
def stage_backbone(tiny_backbone, monkeypatch):
    """The stage builds its backbone itself; give it the session's tiny one (fixed random weights)."""
    monkeypatch.setattr(extract_features, "build_backbone", lambda params: tiny_backbone)
    return tiny_backbone


def _reference_clean(backbone, root: Path, rel_paths: list[str]) -> torch.Tensor:
    pixels = torch.stack([backbone.eval_transform(open_image(root / p)) for p in rel_paths])
    return backbone.encode_images(pixels)


# image features ---------------------------------------------------------------------------------


def test_cached_image_features_equal_freshly_computed_ones(tiny_backbone, image_dir, tmp_path, counter):
    paths = _rel_paths(image_dir)
    first = image_features(tiny_backbone, image_dir, paths, tmp_path / "cache")
    assert counter.images == len(paths) and first.encoded == len(paths) and first.reused == 0
    counter.reset()
    second = image_features(tiny_backbone, image_dir, paths, tmp_path / "cache")
    assert counter.images == 0 and second.encoded == 0 and second.reused == len(paths)
    expected = _reference_clean(tiny_backbone, image_dir, paths)
    assert torch.allclose(first.features, expected, atol=1e-5)
    assert torch.equal(second.features, first.features)
    assert torch.equal(second.rows, torch.arange(len(paths)))
    assert torch.allclose(second.features.norm(dim=-1), torch.ones(len(paths)), atol=1e-5)


def test_real_cifar_jpegs_encode_like_the_backbone(tiny_backbone, tmp_path):
    source = shared_asset("images", "cifar10_test")
    root = tmp_path / "cifar"
    rel_paths = []
    for name in ("airplane", "cat", "ship"):
        for jpg in sorted((source / name).glob("*.jpg"))[:3]:
            (root / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(jpg, root / name / jpg.name)
            rel_paths.append(f"{name}/{jpg.name}")
    result = image_features(tiny_backbone, root, rel_paths, tmp_path / "cache", batch_size=4)
    assert torch.allclose(result.features, _reference_clean(tiny_backbone, root, rel_paths), atol=1e-5)


def test_views_are_deterministic_across_worker_counts_and_differ_from_each_other(tiny_backbone, image_dir, tmp_path):
    paths = _rel_paths(image_dir)[:6]
    in_process = image_features(tiny_backbone, image_dir, paths, tmp_path / "a", views=3, aug_seed=1, batch_size=4)
    in_workers = image_features(tiny_backbone, image_dir, paths, tmp_path / "b", views=3, aug_seed=1, batch_size=5, num_workers=2)
    assert in_process.features.shape == (6, 3, tiny_backbone.embed_dim)
    assert torch.allclose(in_process.features, in_workers.features, atol=1e-6)
    views = in_process.features
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not torch.allclose(views[:, a], views[:, b], atol=1e-3), f"views {a} and {b} are identical"
    other_seed = image_features(tiny_backbone, image_dir, paths, tmp_path / "a", views=3, aug_seed=2)
    assert not torch.allclose(other_seed.features, views, atol=1e-3)
    # a view of an image does not depend on which other images are in the manifest or their order
    reordered = image_features(tiny_backbone, image_dir, paths[::-1][:3], tmp_path / "c", views=3, aug_seed=1)
    assert torch.allclose(reordered.features, views.flip(0)[:3], atol=1e-6)


def test_more_views_encode_only_the_new_views(tiny_backbone, image_dir, tmp_path, counter):
    paths = _rel_paths(image_dir)
    cache = tmp_path / "cache"
    two = image_features(tiny_backbone, image_dir, paths, cache, views=2, aug_seed=1)
    image_features(tiny_backbone, image_dir, paths, cache)  # the clean view, a separate entry
    counter.reset()
    three = image_features(tiny_backbone, image_dir, paths, cache, views=3, aug_seed=1)
    assert counter.images == len(paths), "only view 2 should be encoded"
    assert torch.equal(three.features[:, :2], two.features)
    counter.reset()
    image_features(tiny_backbone, image_dir, paths, cache)
    assert counter.images == 0, "the clean view must not be re-encoded because views changed"


def test_a_changed_image_file_re_encodes_only_that_image(tiny_backbone, image_dir, tmp_path, counter):
    paths = _rel_paths(image_dir)
    before = image_features(tiny_backbone, image_dir, paths, tmp_path / "cache")
    _write_image(image_dir / paths[4], seed=999, size=(50, 50))
    counter.reset()
    after = image_features(tiny_backbone, image_dir, paths, tmp_path / "cache")
    assert counter.images == 1
    assert torch.allclose(after.features[4], _reference_clean(tiny_backbone, image_dir, [paths[4]])[0], atol=1e-5)
    assert not torch.allclose(after.features[4], before.features[4], atol=1e-3)
    unchanged = [i for i in range(len(paths)) if i != 4]
    assert torch.equal(after.features[unchanged], before.features[unchanged])


def test_a_different_backbone_does_not_reuse_the_cache(tiny_backbone, image_dir, tmp_path):
    from aape.backbone import load_backbone
    from aape.config import BackboneConfig

    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in tiny_backbone.model.state_dict().items()}
    torch.save(state, tmp_path / "other.pt")
    other = load_backbone(BackboneConfig(model="aape-tiny", pretrained=str(tmp_path / "other.pt")), device="cpu")
    paths = _rel_paths(image_dir)[:3]
    image_features(tiny_backbone, image_dir, paths, tmp_path / "cache")
    result = image_features(other, image_dir, paths, tmp_path / "cache")
    assert result.encoded == 3, "other weights are another backbone"
    assert torch.allclose(result.features, _reference_clean(other, image_dir, paths), atol=1e-5)


# interrupted and corrupt cache entries -----------------------------------------------------------


def test_interrupted_entry_write_is_not_taken_as_complete(tiny_backbone, image_dir, tmp_path, counter, monkeypatch):
    paths = _rel_paths(image_dir)
    cache = tmp_path / "cache"
    from aape.features import cache as cache_mod

    real_save = cache_mod.atomic_save_tensors

    def crash_after_writing(path, tensors, metadata):
        real_save(path, tensors, metadata)  # the data is fully on disk ...
        raise KeyboardInterrupt  # ... but the run dies before the completion marker

    monkeypatch.setattr(cache_mod, "atomic_save_tensors", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        image_features(tiny_backbone, image_dir, paths, cache)
    monkeypatch.setattr(cache_mod, "atomic_save_tensors", real_save)
    entry = view_entry(tiny_backbone, paths, cache, CLEAN)
    assert entry.data_path.exists() and not entry.is_complete()
    counter.reset()
    result = image_features(tiny_backbone, image_dir, paths, cache)
    assert counter.images == len(paths), "a partial entry must be recomputed"
    assert entry.is_complete()
    assert torch.allclose(result.features, _reference_clean(tiny_backbone, image_dir, paths), atol=1e-5)


def test_crash_while_writing_data_leaves_no_file_under_the_final_name(tmp_path, monkeypatch):
    entry = CacheEntry(tmp_path, "texts", {"what": "test"})

    def dies_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", dies_midway)  # what aape.atomic.atomic_save_tensors calls
    with pytest.raises(KeyboardInterrupt):
        entry.save({"features": torch.ones(2, 3)}, {})
    assert not entry.data_path.exists() and not entry.is_complete()
    assert not list(entry.dir.glob("*.tmp")), "temporary files are cleaned up"


def test_corrupted_data_file_is_detected_and_recomputed(tiny_backbone, tmp_path, counter):
    texts = ["a photo of a boat.", "a photo of a cloud."]
    first = text_features(tiny_backbone, texts, tmp_path)
    entry = next((tmp_path / "features").glob("texts-*"))
    data = entry / "features.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-4:] = b"\x00\x00\x80\x7f"  # same size, different bytes
    data.write_bytes(bytes(raw))
    counter.reset()
    again = text_features(tiny_backbone, texts, tmp_path)
    assert counter.texts == 2
    assert torch.equal(again, first)


# unreadable images ------------------------------------------------------------------------------


def test_corrupt_image_stops_with_its_path_and_keeps_the_work_done(tiny_backbone, image_dir, tmp_path, counter):
    paths = _rel_paths(image_dir)
    broken = image_dir / paths[2]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UnreadableImageError) as err:
        image_features(tiny_backbone, image_dir, paths, tmp_path / "cache")
    assert str(broken) in str(err.value) and "skip_unreadable" in str(err.value)
    counter.reset()
    skipped = image_features(tiny_backbone, image_dir, paths, tmp_path / "cache", skip_unreadable=True)
    assert counter.images == 0, "the readable images were cached before stopping"
    assert [s.path for s in skipped.skipped] == [str(broken)]
    assert skipped.rows.tolist() == [i for i in range(len(paths)) if i != 2]
    kept = [p for i, p in enumerate(paths) if i != 2]
    assert torch.allclose(skipped.features, _reference_clean(tiny_backbone, image_dir, kept), atol=1e-5)


def test_stage_skips_unreadable_images_and_keeps_labels_aligned(run_params, stage_backbone, image_dir):
    layout = Layout.from_params(run_params)
    test_paths = pd.read_parquet(layout.split_manifest("test"))["path"].tolist()
    (image_dir / test_paths[1]).unlink()
    with pytest.raises(UnreadableImageError, match=str(image_dir / test_paths[1])):
        extract_features.run(run_params)
    run_params.data.skip_unreadable = True
    summary = extract_features.run(run_params)
    assert summary["skipped_images"] == 1
    bundle = load_bundle(layout, 1)
    manifest = pd.read_parquet(layout.split_manifest("test"))
    assert bundle.test_rows.tolist() == [i for i in range(len(manifest)) if i != 1]
    assert bundle.test_labels.tolist() == manifest["label"].iloc[bundle.test_rows.numpy()].tolist()
    report = json.loads((layout.features / "skipped.json").read_text())
    assert report == [{"split": "test", "seed": None, "row": 1, "path": str(image_dir / test_paths[1]), "reason": "file does not exist"}]


# text features ----------------------------------------------------------------------------------


def test_text_features_match_the_backbone_and_are_cached(tiny_backbone, tmp_path, counter):
    texts = [f"a photo of a {c}." for c in CLASSNAMES] + ["something else entirely"]
    feats = text_features(tiny_backbone, texts, tmp_path, batch_size=2)
    assert counter.texts == len(texts)
    assert torch.allclose(feats, tiny_backbone.encode_texts(texts), atol=1e-5)
    counter.reset()
    assert torch.equal(text_features(tiny_backbone, texts, tmp_path), feats) and counter.texts == 0


def test_template_ensemble_is_the_normalised_mean(tiny_backbone, tmp_path):
    templates = ["a photo of a {}.", "a drawing of a {}."]
    ensemble = class_template_features(tiny_backbone, CLASSNAMES, templates, tmp_path)
    for c, name in enumerate(CLASSNAMES):
        each = tiny_backbone.encode_texts([t.format(name) for t in templates])
        expected = torch.nn.functional.normalize(each.mean(dim=0), dim=-1)
        assert torch.allclose(ensemble[c], expected, atol=1e-5)


# the stage and the bundle -----------------------------------------------------------------------


def test_stage_writes_the_bundle_and_a_rerun_encodes_nothing(run_params, stage_backbone, counter, image_dir):
    layout = Layout.from_params(run_params)
    first = extract_features.run(run_params)
    assert first["images_encoded"] > 0 and first["random_init"] is True
    bundle = load_bundle(layout, 1)
    train = pd.read_parquet(layout.fewshot_manifest(1, "train"))
    val = pd.read_parquet(layout.fewshot_manifest(1, "val"))
    d = stage_backbone.embed_dim
    assert bundle.train_views.shape == (len(train), 2, d) and bundle.train_clean.shape == (len(train), d)
    assert bundle.train_labels.tolist() == train["label"].tolist() and bundle.val_labels.tolist() == val["label"].tolist()
    assert torch.allclose(bundle.train_clean, _reference_clean(stage_backbone, image_dir, train["path"].tolist()), atol=1e-5)
    assert torch.allclose(bundle.class_prompts, stage_backbone.encode_texts([f"a photo of a {c}." for c in CLASSNAMES]), atol=1e-5)
    descriptions = pd.read_parquet(layout.descriptions)
    assert bundle.description_class.tolist() == descriptions["class_index"].tolist()
    assert torch.allclose(bundle.descriptions, stage_backbone.encode_texts(descriptions["text"].tolist()), atol=1e-5)
    assert bundle.class_ensemble.shape == (3, d) and bundle.classnames == CLASSNAMES
    assert bundle.random_init and bundle.identity == stage_backbone.identity and bundle.embed_dim == d
    assert bundle.logit_scale == pytest.approx(stage_backbone.logit_scale)
    index = json.loads((layout.features / "index.json").read_text())
    assert index["random_init"] is True and "RANDOM-INIT" in index["notice"]
    assert set(index["files"]) == {"test.safetensors", "seed1/train.safetensors", "seed1/val.safetensors", "text.safetensors"}
    headers = {name: bundle_mod.read_metadata(layout.features / name)["format"] for name in index["files"]}
    assert headers == dict.fromkeys(index["files"], bundle_mod.FORMAT)  # every features file names its format

    counter.reset()
    second = extract_features.run(run_params)
    assert counter.images == 0 and counter.texts == 0
    assert second["images_encoded"] == 0 and second["texts_encoded"] == 0
    again = load_bundle(layout, 1)
    assert torch.equal(again.train_views, bundle.train_views) and torch.equal(again.test_features, bundle.test_features)

    run_params.features.augmented_views = 3
    counter.reset()
    extract_features.run(run_params)
    assert counter.images == len(train), "only the third view of the training images is new"
    assert counter.texts == 0


def _normalised_mean(backbone, templates, name):
    return torch.nn.functional.normalize(backbone.encode_texts([t.format(name) for t in templates]).mean(dim=0), dim=-1)


def test_zeroshot_baselines_use_the_dataset_templates_aape_keeps_its_own(run_params, stage_backbone):
    """eurosat: the zero-shot baseline is CoOp's "a centered satellite photo of {}.", the ensemble CLIP's
    three EuroSAT templates; AAPE's class prompts stay "a photo of a {}."."""
    run_params.data.dataset = "EuroSAT"  # CoOp's spelling resolves to the same key
    layout = Layout.from_params(run_params)
    extract_features.run(run_params)
    bundle = load_bundle(layout, 1)
    satellite = [f"a centered satellite photo of {c}." for c in CLASSNAMES]
    assert torch.allclose(bundle.zeroshot_prompts, stage_backbone.encode_texts(satellite), atol=1e-5)
    assert torch.allclose(bundle.class_prompts, stage_backbone.encode_texts([f"a photo of a {c}." for c in CLASSNAMES]), atol=1e-5)
    assert (bundle.zeroshot_prompts - bundle.class_prompts).norm(dim=-1).min() > 1e-3  # really another text set
    clip_eurosat = ["a centered satellite photo of {}.", "a centered satellite photo of a {}.", "a centered satellite photo of the {}."]
    for c, name in enumerate(CLASSNAMES):
        assert torch.allclose(bundle.class_ensemble[c], _normalised_mean(stage_backbone, clip_eurosat, name), atol=1e-5)
    meta = bundle.text_meta
    assert meta["class_template"] == "a photo of a {}." and meta["zeroshot_template"] == "a centered satellite photo of {}."
    assert meta["zeroshot_template_source"] == "CoOp trainers/zsclip.py CUSTOM_TEMPLATES['EuroSAT']"
    assert meta["ensemble_templates"] == clip_eurosat and "CLIP data/prompts.md, EuroSAT" in meta["ensemble_templates_source"]
    index = json.loads((layout.features / "index.json").read_text())
    assert index["zeroshot_template"] == "a centered satellite photo of {}." and index["class_template"] == "a photo of a {}."
    assert len(index["files"]["text.safetensors"]["cache_keys"]) == 4


def test_explicit_baseline_templates_replace_the_dataset_ones(run_params, stage_backbone, counter):
    run_params.features.zeroshot_template = "a sketch of a {}."
    run_params.features.ensemble_templates = ["a photo of a {}.", "a drawing of a {}."]
    layout = Layout.from_params(run_params)
    extract_features.run(run_params)
    bundle = load_bundle(layout, 1)
    assert torch.allclose(bundle.zeroshot_prompts, stage_backbone.encode_texts([f"a sketch of a {c}." for c in CLASSNAMES]), atol=1e-5)
    assert torch.allclose(bundle.class_ensemble[1], _normalised_mean(stage_backbone, ["a photo of a {}.", "a drawing of a {}."], "boat"), atol=1e-5)
    assert bundle.text_meta["zeroshot_template_source"] == "features.zeroshot_template"
    assert bundle.text_meta["ensemble_templates_source"] == "features.ensemble_templates (2 templates)"
    # back to the demo's 'auto': only the new zero-shot texts and ensemble are encoded, AAPE's prompts are cached
    run_params.features.zeroshot_template = "auto"
    run_params.features.ensemble_templates = "auto"
    counter.reset()
    summary = extract_features.run(run_params)
    assert summary["images_encoded"] == 0
    # demo-mnist: CoOp's generic "a photo of a {}." (= class_prompts, cached) and CLIP's one MNIST template
    assert counter.texts == len(CLASSNAMES)
    bundle = load_bundle(layout, 1)
    assert torch.equal(bundle.zeroshot_prompts, bundle.class_prompts)
    assert bundle.text_meta["ensemble_templates"] == ['a photo of the number: "{}".']


def test_text_features_of_an_older_version_ask_for_a_re_extraction(run_params, stage_backbone):
    from safetensors.torch import load_file

    from aape.atomic import atomic_save_tensors

    layout = Layout.from_params(run_params)
    extract_features.run(run_params)
    path = layout.features / "text.safetensors"
    old = {k: v for k, v in load_file(str(path)).items() if k != "class_zeroshot"}
    atomic_save_tensors(path, old, {"identity": stage_backbone.identity})
    bundle = load_bundle(layout, 1)  # the method stages need class_prompts only and still load
    assert bundle.class_zeroshot is None and bundle.class_prompts.shape[0] == len(CLASSNAMES)
    with pytest.raises(FeatureError, match=r"no class_zeroshot.*Re-run `aape extract-features`"):
        bundle.zeroshot_prompts


def test_load_bundle_names_what_is_missing(run_params, stage_backbone):
    layout = Layout.from_params(run_params)
    with pytest.raises(FeatureError, match="index.json is missing"):
        load_bundle(layout, 1)
    extract_features.run(run_params)
    with pytest.raises(FeatureError, match="seed 2"):
        load_bundle(layout, 2)
    index = json.loads((layout.features / "index.json").read_text())
    index["identity"] = "ViT-B-16@tag:openai"
    (layout.features / "index.json").write_text(json.dumps(index))
    with pytest.raises(FeatureError, match="mixes two runs"):
        load_bundle(layout, 1)


def test_stage_reports_missing_inputs(tiny_params, stage_backbone):
    with pytest.raises(ClassesManifestError, match=r"classes.json does not exist; run `aape prepare-data`"):
        extract_features.run(tiny_params)


def test_stage_rerun_in_a_new_process_reuses_the_cache_with_random_init(run_params):
    """Each run builds its own backbone: random-init weights must come out the same every time."""
    first = extract_features.run(run_params)
    second = extract_features.run(run_params)
    assert first["images_encoded"] > 0
    assert second["images_encoded"] == 0 and second["texts_encoded"] == 0


def test_changed_descriptions_re_encode_only_the_descriptions(run_params, stage_backbone, counter):
    layout = Layout.from_params(run_params)
    extract_features.run(run_params)
    descriptions = pd.read_parquet(layout.descriptions)
    extra = descriptions.iloc[[0]].assign(text="a brand new sentence about clouds")
    pd.concat([descriptions, extra], ignore_index=True).to_parquet(layout.descriptions)
    counter.reset()
    summary = extract_features.run(run_params)
    assert counter.images == 0 and summary["images_encoded"] == 0
    assert counter.texts == len(descriptions) + 1, "class prompts and the template ensemble are reused"
    bundle = load_bundle(layout, 1)
    assert bundle.descriptions.shape[0] == len(descriptions) + 1
    assert torch.allclose(bundle.descriptions[-1], stage_backbone.encode_texts(["a brand new sentence about clouds"])[0], atol=1e-5)


class Interrupted(Exception):
    pass


def _interrupt_on_call(backbone, monkeypatch, call: int, before=None):
    """Make backbone.encode_images raise on its `call`-th call (after running `before`)."""
    encode = backbone.encode_images
    calls = {"n": 0}

    def flaky(pixels):
        calls["n"] += 1
        if calls["n"] == call:
            if before is not None:
                before()
            raise Interrupted
        return encode(pixels)

    monkeypatch.setattr(backbone, "encode_images", flaky)


def test_an_interrupted_encoding_keeps_its_work_and_a_rerun_continues(tiny_backbone, image_dir, tmp_path, monkeypatch):
    paths = _rel_paths(image_dir)  # 15 images, batches of 4: interrupted during the third batch
    cache = tmp_path / "cache"
    _interrupt_on_call(tiny_backbone, monkeypatch, call=3)
    with pytest.raises(Interrupted):
        image_features(tiny_backbone, image_dir, paths, cache, batch_size=4)
    monkeypatch.undo()
    counter = EncodeCounter(tiny_backbone, monkeypatch)
    result = image_features(tiny_backbone, image_dir, paths, cache, batch_size=4)
    assert counter.images == len(paths) - 8 and result.reused == 8
    assert torch.allclose(result.features, _reference_clean(tiny_backbone, image_dir, paths), atol=1e-5)
    assert result.skipped == [], "rows not reached are pending, not unreadable"


def test_long_encodings_checkpoint_while_running(tiny_backbone, image_dir, tmp_path, monkeypatch):
    from aape.features import image_encoder

    paths = _rel_paths(image_dir)
    cache = tmp_path / "cache"
    seen = {}

    def inspect_cache():  # what a hard kill (no exception handler) would leave behind
        cached = view_entry(tiny_backbone, paths, cache, CLEAN).load()
        seen["rows"] = cached.tensors["rows"].tolist() if cached else None
        seen["pending"] = (cached.tensors["stats"][:, 0] == -2).sum().item() if cached else None

    monkeypatch.setattr(image_encoder, "CHECKPOINT_EVERY_S", 0.0)
    _interrupt_on_call(tiny_backbone, monkeypatch, call=3, before=inspect_cache)
    with pytest.raises(Interrupted):
        image_features(tiny_backbone, image_dir, paths, cache, batch_size=4)
    assert seen == {"rows": list(range(8)), "pending": len(paths) - 8}


def test_build_backbone_gives_the_same_random_weights_in_every_process(tiny_params):
    from aape.features import build_backbone
    from aape.features.image_encoder import backbone_key

    first, second = build_backbone(tiny_params), build_backbone(tiny_params)
    assert backbone_key(first) == backbone_key(second)
    assert torch.equal(first.encode_texts(["a cloud"]), second.encode_texts(["a cloud"]))


@pytest.mark.parametrize(
    ("requested", "device", "cores", "threads", "expected"),
    [
        ("auto", "cpu", 2, 2, 0),  # the encoder's threads hold every core: decode in the encoding process
        ("auto", "cpu", 16, 12, 4),  # cores the threads leave free decode
        ("auto", "cpu", 64, 8, 8),  # ... at most 8
        ("auto", "cuda", 16, 16, 8),  # beside a GPU: one per core, at most 8
        ("auto", "cuda", 4, 4, 3),  # ... leaving one core to the loop feeding the GPU
        (3, "cpu", 2, 2, 3),  # a number is taken as given
        (0, "cuda", 16, 16, 0),
    ],
)
def test_num_workers_auto_keeps_decoding_off_the_cores_the_cpu_encoder_uses(requested, device, cores, threads, expected, monkeypatch):
    from aape.features.image_encoder import decode_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert decode_workers(requested, torch.device(device)) == expected
