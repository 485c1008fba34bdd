"""The prefix model: where the prefix lands, what trains, and decoding (a tiny random GPT-2, offline)."""

from __future__ import annotations

import pytest
import torch

from aape.vl.prefix import IGNORE, Decoding, PrefixMaps, caption_row, generate, lm_loss, load_language_model, pack, vqa_row


@pytest.fixture(scope="module")
def lm(tiny_lm_path):
    return load_language_model(str(tiny_lm_path))


def test_the_prefix_sits_at_the_lm_input_embeddings_before_the_text_and_only_targets_carry_labels(lm):
    prefix = torch.randn(3, lm.width)
    batch = pack(lm, [vqa_row(lm, prefix, "what color is the shape?", "red")], left_pad=False)
    ids = lm.encode("Q: what color is the shape? A:")
    answer = lm.encode(" red") + [lm.eos_id]
    embeds, labels = batch["inputs_embeds"][0], batch["labels"][0]
    assert embeds.shape[0] == 3 + len(ids) + len(answer)
    assert torch.equal(embeds[:3], prefix)
    assert torch.allclose(embeds[3:3 + len(ids)], lm.embed(torch.tensor(ids)))
    assert labels[:3 + len(ids)].eq(IGNORE).all() and labels[3 + len(ids):].tolist() == answer
    assert batch["position_ids"][0].tolist() == list(range(embeds.shape[0]))


def test_left_padding_puts_every_row_end_at_the_last_position_with_positions_from_zero(lm):
    rows = [caption_row(lm, torch.randn(2, lm.width), "a red circle"), caption_row(lm, torch.randn(2, lm.width), "a circle")]
    batch = pack(lm, rows, left_pad=True)
    mask, positions = batch["attention_mask"], batch["position_ids"]
    assert mask[:, -1].eq(1).all() and mask[1, 0] == 0
    assert positions[1, mask[1].bool()].tolist() == list(range(int(mask[1].sum())))


@pytest.mark.parametrize("train_h", [False, True])
def test_gradients_reach_the_maps_and_h_only_when_finetuned_never_the_lm(lm, train_h):
    maps = PrefixMaps(16, lm.width, tokens=2, aape_tokens=1, hidden=8, train_h=train_h)
    x = torch.randn(2, 16)
    rows = [caption_row(lm, p, c) for p, c in zip(maps(x), ["a red circle", "a blue shape"])]
    lm_loss(lm, pack(lm, rows, left_pad=False)).backward()
    assert all(p.grad is None for p in lm.model.parameters())
    assert maps.image_map.weight.grad.abs().sum() > 0 and maps.aape_map.weight.grad.abs().sum() > 0
    h_grads = [p.grad for p in maps.h.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in h_grads) if train_h else all(g is None for g in h_grads)


def test_the_loss_is_the_mean_cross_entropy_of_the_target_tokens(lm):
    prefix = torch.randn(2, lm.width)
    batch = pack(lm, [caption_row(lm, prefix, "a red circle")], left_pad=False)
    logits = lm.model(inputs_embeds=batch["inputs_embeds"]).logits[0]
    targets = lm.encode(" a red circle") + [lm.eos_id]
    # the prefix has 2 positions: token j of the target is predicted at position 1 + j
    expected = torch.stack([-logits[1 + j].log_softmax(-1)[t] for j, t in enumerate(targets)]).mean()
    assert lm_loss(lm, batch).item() == pytest.approx(expected.item(), rel=1e-5)


def test_cached_greedy_decoding_equals_recomputing_the_whole_sequence_and_padding_changes_nothing(lm):
    torch.manual_seed(3)
    prefixes = [torch.randn(2, lm.width), torch.randn(3, lm.width)]
    rows = [caption_row(lm, prefixes[0]), vqa_row(lm, prefixes[1], "what shape is it?")]
    decoding = Decoding(max_new_tokens=6)
    batched = generate(lm, rows, decoding)
    assert batched == [generate(lm, [row], decoding)[0] for row in rows]
    # reference: no cache, argmax of a full forward after each token
    embeds = pack(lm, [rows[0]], left_pad=True)["inputs_embeds"]
    tokens = []
    for _ in range(6):
        token = int(lm.model(inputs_embeds=embeds).logits[0, -1].argmax())
        if token == lm.eos_id:
            break
        tokens.append(token)
        embeds = torch.cat([embeds, lm.embed(torch.tensor([[token]]))], dim=1)
    assert batched[0] == lm.decode(tokens)


def test_sampling_is_reproducible_by_seed_and_a_tiny_top_p_is_greedy(lm):
    row = [caption_row(lm, torch.randn(2, lm.width))]
    sampled = Decoding(mode="sample", temperature=1.5, top_p=0.999, max_new_tokens=8)
    assert generate(lm, row, sampled, seed=1) == generate(lm, row, sampled, seed=1)
    assert len({generate(lm, row, sampled, seed=s)[0] for s in range(6)}) > 1
    assert generate(lm, row, Decoding(mode="sample", top_p=1e-6, max_new_tokens=8), seed=5) == generate(lm, row, Decoding(max_new_tokens=8))


def test_a_trained_image_map_makes_the_frozen_lm_say_the_caption(lm):
    torch.manual_seed(0)
    maps = PrefixMaps(8, lm.width, tokens=4)
    x = torch.eye(8)[:2]
    captions = ["a small red circle", "the blue triangle"]
    optimiser = torch.optim.Adam(maps.parameters(), lr=1e-2)
    for _ in range(200):
        optimiser.zero_grad()
        loss = lm_loss(lm, pack(lm, [caption_row(lm, p, c) for p, c in zip(maps(x), captions)], left_pad=False))
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        assert generate(lm, [caption_row(lm, p) for p in maps(x)], Decoding(max_new_tokens=8)) == captions


def test_vqa_few_shot_rows_interleave_each_example_image_before_its_question(lm):
    shot, query = torch.ones(2, lm.width), torch.zeros(2, lm.width)
    row = vqa_row(lm, query, "what shape?", shots=[(shot, "what color?", "red")])
    assert [s.prefix is not None for s in row] == [True, False, True, False]
    assert lm.decode(row[1].ids) == "Q : what color ? A : red"  # a word-level tokenizer: spaces around every token
