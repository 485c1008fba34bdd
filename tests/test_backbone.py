"""The backbone factory: real architectures by name, explicit random init, fast failure without weights."""

import pytest
import torch

from aape.backbone import BackboneError, _pooled_length, encode_text_trimmed, load_backbone
from aape.config import BackboneConfig


def test_tiny_backbone_builds_fast_and_embeds_normalised(tiny_backbone):
    assert tiny_backbone.random_init
    assert tiny_backbone.identity == "aape-tiny@random-init"
    assert tiny_backbone.embed_dim == 64 and tiny_backbone.image_size == 32
    text = tiny_backbone.encode_texts(["a photo of a cat.", "a photo of a dog."])
    images = tiny_backbone.encode_images(torch.randn(3, 3, 32, 32))
    assert text.shape == (2, 64) and images.shape == (3, 64)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not any(p.requires_grad for p in tiny_backbone.model.parameters())


def test_unreachable_pretrained_weights_fail_fast_with_instructions(monkeypatch):
    # "fast" is checked by what happens, not by a clock: the offline setting is honoured before any
    # download is tried (speed belongs in benchmarks/, not in a unit test on a shared machine)
    import open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("tried to build or download the model"))
    with pytest.raises(BackboneError) as err:
        load_backbone(BackboneConfig(model="ViT-B-16", pretrained="openai"), device="cpu")
    message = str(err.value)
    assert "are not in the local cache and HF_HUB_OFFLINE is set" in message
    assert "ViT-B-16/openai" in message
    assert "backbone.pretrained: /path/to/checkpoint" in message and "random-init" in message


def test_unknown_tag_lists_known_tags():
    with pytest.raises(BackboneError, match="openai"):
        load_backbone(BackboneConfig(model="ViT-B-16", pretrained="no-such-tag"), device="cpu")


def test_missing_checkpoint_file_is_named(tmp_path):
    missing = tmp_path / "weights.safetensors"
    with pytest.raises(BackboneError, match=str(missing)):
        load_backbone(BackboneConfig(model="aape-tiny", pretrained=str(missing)), device="cpu")


def test_unknown_architecture_is_named():
    with pytest.raises(BackboneError, match="ViT-Q-99"):
        load_backbone(BackboneConfig(model="ViT-Q-99", pretrained="random-init"), device="cpu")


def test_local_checkpoint_loads_the_same_weights(tmp_path, tiny_backbone):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    loaded = load_backbone(BackboneConfig(model="aape-tiny", pretrained=str(path)), device="cpu")
    assert not loaded.random_init and loaded.identity.startswith("aape-tiny@file:tiny.pt:")
    texts = ["a photo of a ship."]
    assert torch.allclose(loaded.encode_texts(texts), tiny_backbone.encode_texts(texts), atol=1e-6)


def test_image_size_override_changes_transforms(tiny_backbone):
    from PIL import Image

    big = load_backbone(BackboneConfig(model="aape-tiny", pretrained="random-init"), device="cpu", image_size=48)
    image = Image.new("RGB", (100, 80), (200, 10, 10))
    assert big.eval_transform(image).shape == (3, 48, 48)
    assert tiny_backbone.train_transform(image).shape == (3, 32, 32)


def test_random_init_weights_are_the_same_in_every_load():
    """Separate stages (and processes) must build one network, or cached features would not match."""
    cfg = BackboneConfig(model="aape-tiny", pretrained="random-init")
    torch.manual_seed(123)
    first = load_backbone(cfg, device="cpu").encode_texts(["a photo of a cat."])
    torch.manual_seed(456)
    second = load_backbone(cfg, device="cpu").encode_texts(["a photo of a cat."])
    assert torch.equal(first, second)
    # and the caller's random stream is left as it was
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    load_backbone(cfg, device="cpu")
    assert torch.equal(torch.rand(1), expected)


@pytest.mark.parametrize(
    "cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")], ids=["cuda", "mps-only", "cpu"]
)
def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    from aape.backbone import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto") == torch.device(expected)


def test_explicit_devices_are_kept_and_a_missing_cuda_is_an_error(monkeypatch):
    from aape.backbone import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [resolve_device(name) for name in ("cpu", "mps")] == [torch.device("cpu"), torch.device("mps")]
    with pytest.raises(BackboneError, match="run.device is 'cuda' but no CUDA device is visible"):
        resolve_device("cuda")


def test_text_cut_to_the_last_end_of_text_token_equals_the_full_77_positions(tiny_backbone):
    model = tiny_backbone.model
    tokens = tiny_backbone.tokenizer(["a photo of a cat.", "a satellite photo of a river crossing a large green forest, seen from above."])
    full = model.encode_text(tokens)
    cut_at = _pooled_length(model, tokens)
    assert cut_at == int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]  # the longer text's end-of-text token + 1
    torch.testing.assert_close(encode_text_trimmed(model, tokens), full, rtol=1e-5, atol=1e-5)
    # a batch of short texts is cut shorter, and each row still equals its full-length embedding
    short = tiny_backbone.tokenizer(["a cat.", "a dog."])
    assert _pooled_length(model, short) < cut_at
    torch.testing.assert_close(encode_text_trimmed(model, short), model.encode_text(short), rtol=1e-5, atol=1e-5)


def test_sorted_batches_give_every_text_its_own_embedding(tiny_backbone):
    from aape.features.text_encoder import _encode

    texts = ["a much longer description of a forest with many tall trees.", "a cat.", "a river seen from far above.", "a dog."]
    batched = _encode(tiny_backbone, texts, batch_size=2, desc="texts")
    one_by_one = torch.cat([tiny_backbone.encode_texts([t]) for t in texts])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)
