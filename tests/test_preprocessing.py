"""Image preprocessing split for speed: uint8 out of the decoding workers, normalised in the encoder
(bit-identical to torchvision's ToTensor + Normalize), and large JPEGs decoded at reduced scale."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms as T

from aape.backbone import load_backbone
from aape.config import BackboneConfig
from aape.data.images import open_image
from aape.features.image_encoder import ViewSpec, augmented_views, encode_views, preprocessing_key, view_seed


def _photo(path, size=(640, 480)) -> None:
    """A JPEG with smooth gradients and some texture, like a photograph (not flat colour)."""
    w, h = size
    g = torch.Generator().manual_seed(3)
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    blocks = torch.rand(-(-h // 8), -(-w // 8), 3, generator=g).repeat_interleave(8, 0).repeat_interleave(8, 1)[:h, :w]
    base = torch.stack([x, y, (x + y) / 2], dim=-1) * 200 + blocks * 55
    Image.fromarray(base.clamp(0, 255).to(torch.uint8).numpy()).save(path, quality=92)


def _reference(backbone, transform_head: list) -> T.Compose:
    """The float pipeline used before the split: the same PIL steps, then ToTensor + Normalize."""
    return T.Compose([*transform_head, T.ToTensor(), T.Normalize(backbone.mean, backbone.std)])


def test_uint8_transforms_plus_normalize_are_bit_identical_to_totensor_normalize(tiny_backbone, tmp_path):
    _photo(tmp_path / "a.jpg", (90, 70))
    image = open_image(tmp_path / "a.jpg")
    evaluated = tiny_backbone.eval_transform(image)
    assert evaluated.dtype == torch.uint8 and evaluated.shape == (3, 32, 32)
    reference = _reference(tiny_backbone, tiny_backbone.eval_transform.transforms[:-1])(image)
    assert torch.equal(tiny_backbone.normalize(evaluated.unsqueeze(0))[0], reference)
    # augmented views: the same random crop under the same seed, then the same equality
    torch.manual_seed(5)
    augmented = tiny_backbone.train_transform(image)
    torch.manual_seed(5)
    reference = _reference(tiny_backbone, tiny_backbone.train_transform.transforms[:-1])(image)
    assert torch.equal(tiny_backbone.normalize(augmented.unsqueeze(0))[0], reference)


def test_already_normalised_float_pixels_pass_through_unchanged(tiny_backbone):
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.equal(tiny_backbone.normalize(pixels), pixels)


def test_large_jpeg_is_decoded_at_reduced_scale_small_ones_are_not(tmp_path):
    _photo(tmp_path / "big.jpg", (640, 480))
    _photo(tmp_path / "small.jpg", (60, 40))
    Image.open(tmp_path / "big.jpg").save(tmp_path / "big.png")
    # 480 / 224 = 2.1: half scale keeps both sides >= 224; a quarter would not
    assert open_image(tmp_path / "big.jpg", draft_size=224).size == (320, 240)
    assert open_image(tmp_path / "big.jpg", draft_size=100).size == (160, 120)  # 480 / 100 = 4.8 -> 1/4
    assert open_image(tmp_path / "big.jpg").size == (640, 480)
    assert open_image(tmp_path / "small.jpg", draft_size=32).size == (60, 40)  # under twice the size
    assert open_image(tmp_path / "big.png", draft_size=224).size == (640, 480)  # only JPEGs have a draft mode


def test_reduced_scale_decoding_changes_pixels_only_slightly(tmp_path):
    # tolerance stated in docs/method.md: mean absolute difference under 2 of 255 on a photo-like image
    _photo(tmp_path / "big.jpg", (640, 480))
    drafted = load_backbone(BackboneConfig(model="aape-tiny", pretrained="random-init", jpeg_draft=True), device="cpu", image_size=224)
    full = load_backbone(BackboneConfig(model="aape-tiny", pretrained="random-init", jpeg_draft=False), device="cpu", image_size=224)
    a = drafted.eval_transform(open_image(tmp_path / "big.jpg", drafted.draft_size)).float()
    b = full.eval_transform(open_image(tmp_path / "big.jpg", full.draft_size)).float()
    difference = (a - b).abs().mean().item()
    assert 0 < difference < 2.0


def test_reduced_scale_decoding_is_its_own_feature_version_and_only_for_the_evaluation_view(tmp_path):
    on = load_backbone(BackboneConfig(model="aape-tiny", pretrained="random-init", jpeg_draft=True), device="cpu")
    off = load_backbone(BackboneConfig(model="aape-tiny", pretrained="random-init", jpeg_draft=False), device="cpu")
    clean, view = ViewSpec(), augmented_views(1, 1)[0]
    assert preprocessing_key(on, clean)["jpeg_draft"] == 32 and preprocessing_key(off, clean)["jpeg_draft"] is None
    assert preprocessing_key(on, view) == preprocessing_key(off, view)  # augmented views decode in full either way


def test_one_pass_over_an_image_gives_the_reduced_decode_to_the_evaluation_view_and_the_full_one_to_augmented_views(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    _photo(root / "big.jpg", (640, 480))
    backbone = load_backbone(BackboneConfig(model="aape-tiny", pretrained="random-init"), device="cpu")  # 32 px: 1/8 scale
    view = augmented_views(1, 1)[0]
    features, _, _, _ = encode_views(backbone, root, ["big.jpg"], tmp_path / "cache", [ViewSpec(), view])
    clean_by_hand = backbone.eval_transform(open_image(root / "big.jpg", draft_size=32))
    torch.manual_seed(view_seed(1, "big.jpg", 0))
    augmented_by_hand = backbone.train_transform(open_image(root / "big.jpg"))
    torch.testing.assert_close(features[ViewSpec()], backbone.encode_images(clean_by_hand.unsqueeze(0)), rtol=0, atol=1e-6)
    torch.testing.assert_close(features[view], backbone.encode_images(augmented_by_hand.unsqueeze(0)), rtol=0, atol=1e-6)
    # and the two decodes did differ, so the check above can tell them apart
    full_clean = backbone.eval_transform(open_image(root / "big.jpg"))
    assert not torch.equal(full_clean, clean_by_hand)
