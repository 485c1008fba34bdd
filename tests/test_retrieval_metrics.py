"""Recall@K for image-text retrieval: i2t counts an image right when any of its captions is in the
top K, t2i when a caption's one image is; ties count against the query; inputs are checked."""

import pytest
import torch

from aape.errors import AAPEError
from aape.retrieval.metrics import RetrievalInputError, recall_at_k, retrieval_ranks

THREE_IMAGES = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)


def three_image_matrix() -> torch.Tensor:
    """3 images x 15 captions (5 each) with known ranks.

    image 0: its captions 0-4 score 0.9..0.5, every other caption 0.1   -> i2t rank 0
    image 1: its captions score 0.4; captions 0-4 and 10 (6 wrong) 0.8   -> i2t rank 6
    image 2: its captions score 0.5; captions 0, 1, 2 (3 wrong) 0.7      -> i2t rank 3
    """
    s = torch.zeros(3, 15)
    s[0] = 0.1
    s[0, :5] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    s[1, 5:10] = 0.4
    s[1, [0, 1, 2, 3, 4, 10]] = 0.8
    s[2, 10:] = 0.5
    s[2, [0, 1, 2]] = 0.7
    return s


def test_ranks_of_the_hand_built_matrix():
    i2t, t2i = retrieval_ranks(three_image_matrix(), THREE_IMAGES)
    assert i2t.tolist() == [0, 6, 3]
    # caption 1: its image 0 scores 0.8 and image 1 ties at 0.8 -> rank 1 (a tie counts against it);
    # caption 2: 0.7 with image 1 at 0.8 and image 2 tied at 0.7 -> rank 2
    assert t2i.tolist() == [0, 1, 2, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]


def test_recall_at_k_in_percent_both_ways_and_rsum():
    result = recall_at_k(three_image_matrix(), THREE_IMAGES)
    assert list(result) == ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]
    assert result["i2t_R@1"] == pytest.approx(100 / 3)  # only image 0
    assert result["i2t_R@5"] == pytest.approx(200 / 3)  # image 2 (rank 3) too
    assert result["i2t_R@10"] == pytest.approx(100.0)  # image 1 (rank 6) too
    assert result["t2i_R@1"] == pytest.approx(100 * 10 / 15)
    assert result["t2i_R@5"] == result["t2i_R@10"] == pytest.approx(100.0)  # K >= 3 images holds all
    assert result["rsum"] == pytest.approx(100 / 3 + 200 / 3 + 100 + 200 / 3 + 100 + 100)


def test_any_one_caption_in_the_top_k_makes_an_image_correct():
    # image 0's captions 0-3 are last, caption 4 is first: i2t rank 0
    s = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.9, 0.8, 0.7, 0.6, 0.5]])
    i2t, _ = retrieval_ranks(s, torch.tensor([0] * 5 + [1] * 5))
    assert i2t.tolist() == [0, 0]


def test_a_tied_wrong_caption_ranks_ahead_of_the_correct_one():
    # image 0: its best caption (0.7) ties with image 1's caption 5 -> rank 1, wrong at R@1
    s = torch.tensor([[0.7, 0.2, 0.2, 0.2, 0.2, 0.7, 0.1, 0.1, 0.1, 0.1],
                      [0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9, 0.9]])
    images = torch.tensor([0] * 5 + [1] * 5)
    i2t, _ = retrieval_ranks(s, images)
    assert i2t.tolist() == [1, 0]  # image 1: its five captions tie with each other, still rank 0
    assert recall_at_k(s, images, ks=(1, 2))["i2t_R@1"] == pytest.approx(50.0)
    assert recall_at_k(s, images, ks=(1, 2))["i2t_R@2"] == pytest.approx(100.0)


def test_a_tied_wrong_image_ranks_ahead_of_the_correct_one():
    s = torch.tensor([[0.5, 0.3], [0.5, 0.4]])  # caption 0 scores 0.5 with both images
    _, t2i = retrieval_ranks(s, torch.tensor([0, 1]))
    assert t2i.tolist() == [1, 0]


def test_a_constant_model_scores_zero_not_one_hundred():
    # the pessimistic rule: all-equal scores (e.g. collapsed embeddings) rank every query last
    result = recall_at_k(torch.zeros(3, 15), THREE_IMAGES, ks=(1, 5))
    i2t, t2i = retrieval_ranks(torch.zeros(3, 15), THREE_IMAGES)
    assert i2t.tolist() == [10, 10, 10] and t2i.tolist() == [2] * 15
    assert result["i2t_R@1"] == result["i2t_R@5"] == result["t2i_R@1"] == 0.0
    assert result["t2i_R@5"] == 100.0  # K = 5 > 3 images: every image is in the top 5


def test_only_the_captions_passed_in_are_ranked():
    # captions 0-4 belong to image 0 and 5-9 to image 1 (the test split); column 10 is a caption of
    # image 1 from another split that scores highest for image 0
    full = torch.tensor([[0.8, 0.3, 0.3, 0.3, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.9],
                         [0.1, 0.1, 0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.7, 0.7, 0.1]])
    with_other = recall_at_k(full, torch.tensor([0] * 5 + [1] * 6), ks=(1,))
    test_only = recall_at_k(full[:, :10], torch.tensor([0] * 5 + [1] * 5), ks=(1,))
    assert with_other["i2t_R@1"] == pytest.approx(50.0)  # the extra caption outranks image 0's
    assert test_only["i2t_R@1"] == pytest.approx(100.0)
    assert test_only["t2i_R@1"] == pytest.approx(100.0)


def _naive_ranks(s: torch.Tensor, images: list[int]) -> tuple[list[int], list[int]]:
    """The rule written out with loops: wrong candidates scoring >= the best correct one."""
    i2t = []
    for i in range(s.shape[0]):
        best = max(s[i, c].item() for c in range(s.shape[1]) if images[c] == i)
        i2t.append(sum(1 for c in range(s.shape[1]) if images[c] != i and s[i, c].item() >= best))
    t2i = [sum(1 for i in range(s.shape[0]) if i != images[c] and s[i, c].item() >= s[images[c], c].item())
           for c in range(s.shape[1])]
    return i2t, t2i


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 1024, None])
def test_chunked_ranks_match_the_rule_written_out(chunk_size, monkeypatch):
    monkeypatch.setattr("aape.retrieval.metrics._MASK_BUDGET", 9 * 17 * 2)  # default: 2 image queries a chunk
    generator = torch.Generator().manual_seed(0)
    images = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4, 4, 4, 4, 4, 5]  # 1 to 6 captions per image
    s = torch.randint(0, 4, (6, len(images)), generator=generator).float()  # many ties
    i2t, t2i = retrieval_ranks(s, torch.tensor(images), chunk_size=chunk_size)
    assert (i2t.tolist(), t2i.tolist()) == _naive_ranks(s, images)


def test_integer_and_half_precision_scores_are_ranked_alike():
    s = three_image_matrix()
    expected = recall_at_k(s, THREE_IMAGES)
    assert recall_at_k(s.half(), THREE_IMAGES) == expected
    assert recall_at_k((s * 10).round().int(), THREE_IMAGES.int()) == expected


def test_k_larger_than_the_candidates_is_one_hundred_percent():
    result = recall_at_k(three_image_matrix(), THREE_IMAGES, ks=(20, 1000))
    assert result["i2t_R@20"] == result["t2i_R@1000"] == 100.0
    assert result["rsum"] == 400.0


def test_a_caption_of_an_unknown_image_is_named():
    with pytest.raises(RetrievalInputError, match=r"outside 0\.\.2 \(similarity has 3 rows\): caption 14 -> image 3") as info:
        recall_at_k(three_image_matrix(), torch.tensor([0] * 5 + [1] * 5 + [2] * 4 + [3]))
    assert isinstance(info.value, AAPEError) and isinstance(info.value, ValueError)
    with pytest.raises(RetrievalInputError, match=r"caption 0 -> image -1"):
        recall_at_k(three_image_matrix(), torch.tensor([-1] + [0] * 4 + [1] * 5 + [2] * 5))


def test_an_image_without_captions_is_named():
    with pytest.raises(RetrievalInputError, match=r"1 image\(s\) have no caption.*\[1\]"):
        recall_at_k(three_image_matrix(), torch.tensor([0] * 10 + [2] * 5))


@pytest.mark.parametrize(
    "similarity, images, ks, match",
    [
        (torch.zeros(3), THREE_IMAGES, (1,), "2-D"),
        (torch.zeros(0, 15), THREE_IMAGES, (1,), "0 x 15"),
        (torch.zeros(3, 15), THREE_IMAGES[:14], (1,), "one entry per caption"),
        (torch.zeros(3, 15), THREE_IMAGES.float(), (1,), "integer image indices"),
        (torch.zeros(3, 15), THREE_IMAGES, (), "at least one K"),
        (torch.zeros(3, 15), THREE_IMAGES, (0, 5), r"positive integers; got \[0\]"),
        (torch.zeros(3, 15), THREE_IMAGES, (1.5,), "positive integers"),
        (torch.zeros(3, 15, dtype=torch.bool), THREE_IMAGES, (1,), "real scores"),
        (torch.zeros(3, 15), THREE_IMAGES, (1,), "chunk_size"),
    ],
)
def test_malformed_inputs_are_refused(similarity, images, ks, match):
    chunk_size = 0 if match == "chunk_size" else None
    with pytest.raises(RetrievalInputError, match=match):
        recall_at_k(similarity, images, ks=ks, chunk_size=chunk_size)


def test_nan_scores_are_refused():
    s = three_image_matrix()
    s[2, 3] = float("nan")  # a wrong caption of image 2: only the row check sees it
    with pytest.raises(RetrievalInputError, match=r"rows 0\.\.2 contain NaN"):
        recall_at_k(s, THREE_IMAGES)


def test_duplicate_ks_are_reported_once():
    result = recall_at_k(three_image_matrix(), THREE_IMAGES, ks=(5, 1, 5))
    assert list(result) == ["i2t_R@5", "i2t_R@1", "t2i_R@5", "t2i_R@1", "rsum"]


def test_a_plain_list_maps_captions_to_images():
    assert recall_at_k(three_image_matrix(), THREE_IMAGES.tolist()) == recall_at_k(three_image_matrix(), THREE_IMAGES)
