"""Grid features (LiMBeR's image prefix): the encoder's vectors before pooling, cached as memory-maps
that survive interruptions, and the prefix map that reads them."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from aape.backbone import BackboneError, load_backbone
from aape.config import BackboneConfig
from aape.features import grid as grid_module
from aape.features.bundle import FeatureError
from aape.features.grid import encode_grids, grid_shape, grid_tokens, read_grid
from aape.features.image_encoder import CLEAN, _DecodeDataset
from aape.layout import Layout
from aape.vl.prefix import PrefixMaps


@pytest.fixture(scope="module")
def tiny_resnet():
    """aape-tiny-rn: open_clip's ModifiedResNet at 64 px, a 2 x 2 grid of 512-wide vectors."""
    return load_backbone(BackboneConfig(model="aape-tiny-rn", pretrained="random-init"), device="cpu")


def _pixels(backbone, n: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, backbone.image_size, backbone.image_size), dtype=torch.uint8, generator=generator)


def _images(root: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return [f"{i}.png" for i in range(n)]


def _eval_views(backbone, root: Path, rel_paths: list[str]) -> torch.Tensor:
    dataset = _DecodeDataset(root, rel_paths, [(i, (0,)) for i in range(len(rel_paths))], [CLEAN],
                             backbone.eval_transform, backbone.train_transform, backbone.draft_size)
    return torch.cat([dataset[i][2] for i in range(len(dataset))])


def test_a_resnet_grid_is_what_attention_pooling_reads(tiny_resnet):
    """LiMBeR drops RN50x16's attention pool and keeps its input: pooling our grid gives the CLIP embedding."""
    pixels = _pixels(tiny_resnet)
    grid = grid_tokens(tiny_resnet, pixels)
    assert grid.shape == (3, 4, 512) and grid_shape(tiny_resnet) == (4, 512)
    with torch.no_grad():
        pooled = tiny_resnet.model.visual.attnpool(grid.transpose(1, 2).reshape(3, 512, 2, 2))
        reference = tiny_resnet.model.visual(tiny_resnet.normalize(pixels))
    torch.testing.assert_close(pooled, reference, rtol=0, atol=1e-6)


def test_a_vit_grid_is_its_patch_tokens_after_the_final_norm(tiny_backbone):
    pixels = _pixels(tiny_backbone)
    visual = tiny_backbone.model.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = visual(tiny_backbone.normalize(pixels))
    finally:
        visual.output_tokens = False
    assert grid_shape(tiny_backbone) == (16, 64)  # 32 px / 8 px patches, the class token dropped
    torch.testing.assert_close(grid_tokens(tiny_backbone, pixels), tokens, rtol=0, atol=0)


def test_a_tower_without_a_grid_is_refused_naming_the_setting():
    backbone = SimpleNamespace(model=SimpleNamespace(visual=torch.nn.Linear(2, 2)), name="odd-model")
    with pytest.raises(BackboneError, match="odd-model.*prefix.image_features: pooled"):
        grid_tokens(backbone, torch.zeros(1, 3, 4, 4))


def test_grids_are_stored_in_float16_and_a_second_call_encodes_nothing(tiny_resnet, tmp_path, monkeypatch):
    paths = _images(tmp_path, 5)
    grids = encode_grids(tiny_resnet, tmp_path, paths, tmp_path / "cache", batch_size=2)
    assert grids.shape == (5, 4, 512) and grids.array.dtype == np.float16
    expected = grid_tokens(tiny_resnet, _eval_views(tiny_resnet, tmp_path, paths))
    torch.testing.assert_close(grids.take([4, 0]), expected[[4, 0]].half().float(), rtol=0, atol=0)
    monkeypatch.setattr(grid_module, "grid_tokens", lambda *a: pytest.fail("encoded again"))
    assert encode_grids(tiny_resnet, tmp_path, paths, tmp_path / "cache", batch_size=2).path == grids.path


def test_an_interrupted_encoding_keeps_its_rows_and_a_rerun_encodes_only_the_rest(tiny_resnet, tmp_path, monkeypatch):
    paths = _images(tmp_path, 6)
    real, encoded = grid_module.grid_tokens, []

    def stop_after_two_batches(backbone, pixels):
        if len(encoded) == 4:
            raise KeyboardInterrupt
        encoded.extend(range(len(pixels)))
        return real(backbone, pixels)

    monkeypatch.setattr(grid_module, "grid_tokens", stop_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        encode_grids(tiny_resnet, tmp_path, paths, tmp_path / "cache", batch_size=2)
    entry = grid_module.grid_entry(tiny_resnet, paths, tmp_path / "cache").dir
    assert np.load(entry / "done.npy").tolist() == [1, 1, 1, 1, 0, 0] and not (entry / "COMPLETE").exists()
    with pytest.raises(FeatureError, match="missing or unfinished.*aape extract-features"):
        grid_module.open_grid(entry)

    encoded.clear()
    monkeypatch.setattr(grid_module, "grid_tokens", lambda b, p: (encoded.extend(range(len(p))), real(b, p))[1])
    grids = encode_grids(tiny_resnet, tmp_path, paths, tmp_path / "cache", batch_size=2)
    assert len(encoded) == 2  # rows 4 and 5 only
    expected = real(tiny_resnet, _eval_views(tiny_resnet, tmp_path, paths)).half().float()
    torch.testing.assert_close(grids.take(range(6)), expected, rtol=0, atol=0)

    Image.new("RGB", (30, 30), "red").save(tmp_path / "2.png")  # a changed file is encoded again, alone
    os.utime(tmp_path / "2.png", ns=(1, 1))
    encoded.clear()
    encode_grids(tiny_resnet, tmp_path, paths, tmp_path / "cache", batch_size=2)
    assert len(encoded) == 1


def test_grids_that_do_not_fit_on_the_disk_are_refused_before_anything_is_written(tiny_resnet, tmp_path, monkeypatch):
    paths = _images(tmp_path, 2)
    monkeypatch.setattr(grid_module.shutil, "disk_usage", lambda _: SimpleNamespace(free=10**6))
    with pytest.raises(FeatureError, match=r"need 0\.0 GB .* only 0\.0 GB is free.*run.cache_dir"):
        encode_grids(tiny_resnet, tmp_path, paths, tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("grid.npy"))


def test_a_run_without_grid_pointers_says_to_rerun_extract_features(tiny_params):
    with pytest.raises(FeatureError, match="grid_train.json not found.*aape extract-features"):
        read_grid(Layout.from_params(tiny_params), "train")


def test_the_grid_map_is_one_linear_layer_shared_by_every_grid_vector():
    maps = PrefixMaps(8, 6, tokens=3, aape_tokens=1, hidden=4, grid_channels=5)
    x, grid = torch.randn(2, 8), torch.randn(2, 3, 5)
    prefix = maps(x, grid=grid)
    assert prefix.shape == (2, 3 + 1, 6) and maps.image_map.weight.shape == (6, 5)
    for token in range(3):
        torch.testing.assert_close(prefix[:, token], maps.image_map(grid[:, token]))
    torch.testing.assert_close(prefix[:, 3], maps.aape_map(maps.h(x)))
    with pytest.raises(ValueError, match="grids of 3 x 5 vectors, got \\(4, 5\\)"):
        maps(x, grid=torch.randn(2, 4, 5))


def test_image_token_dropout_acts_in_training_only():
    maps = PrefixMaps(8, 6, tokens=2, dropout=0.5)
    x = torch.randn(4, 8)
    assert (maps(x) == 0).any()
    torch.testing.assert_close(maps.eval()(x), maps.image_map(x).view(4, 2, 6))
