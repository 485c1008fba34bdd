"""Caption, CLIPScore and VQA metrics against values worked out by hand on small cases."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from aape.errors import AAPEError
from aape.vl import metrics as m
from aape.vl.metrics import (
    CLIP_S_PREFIX,
    VLMetricError,
    caption_scores,
    clip_s,
    normalize_answer,
    ref_clip_s,
    tokenize,
    truncate_answer,
    vqa_accuracy,
    vqa_score,
    with_prefix,
)

JAVA = shutil.which("java") is not None


@pytest.fixture
def no_java(monkeypatch):
    """Java absent: the pure-Python tokenizer, no METEOR or SPICE (and no JVM start-up in the test)."""
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)


# --------------------------------------------------------------------------------------------------
# tokenization
# --------------------------------------------------------------------------------------------------

def test_python_tokenizer_lowercases_and_drops_punctuation(no_java):
    tokens, name = tokenize({"1": ["A man, riding a horse.", "It's a dog's life!"]})
    assert name == "python-ptb-approximation"
    assert tokens == {"1": ["a man riding a horse", "it 's a dog 's life"]}


def test_python_tokenizer_follows_ptb_quirks():
    # PTB with -lowerCase writes brackets as -lrb-/-rrb-, which pycocoevalcap's upper-case list keeps
    assert m.python_ptb_tokenize("A zebra (or two) in a field.") == "a zebra -lrb- or two -rrb- in a field"
    assert m.python_ptb_tokenize("Don't cross 1,000 roads at 5:30 p.m.") == "do n't cross 1,000 roads at 5:30 p.m."


def test_dropped_tokens_are_pycocoevalcaps():
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    assert m.PTB_DROPPED == set(PUNCTUATIONS)


@pytest.mark.skipif(not JAVA, reason="needs java for the real PTBTokenizer")
def test_python_tokenizer_matches_ptb_on_plain_captions():
    captions = ["A man, riding a horse.", "Two dogs don't play in the man's yard!", "",
                'A sign that reads "STOP" -- in red...', "A plate with a sandwich, fries, and a pickle.",
                "A clock tower shows 12:45; it's late?", "The dogs' bowls (blue) are by the U.S. flag."]
    tokens, name = tokenize({"x": captions})
    assert name == "ptb"
    assert tokens["x"] == [m.python_ptb_tokenize(c) for c in captions]


# --------------------------------------------------------------------------------------------------
# caption scores
# --------------------------------------------------------------------------------------------------

REFS = {"img1": ["a dog runs on the beach"] * 2, "img2": ["a red bus in the city"] * 2,
        "img3": ["two cats sleep on a sofa"] * 2}


def test_cider_d_identical_is_10_and_disjoint_is_0(no_java):
    # identical: every n-gram order has a weighted n-gram (only "a" is in every image, idf 0), so each
    # per-order cosine is 1, the length penalty is 1, and the score is 10 * mean(1, 1, 1, 1) = 10
    same = caption_scores({k: v[0] for k, v in REFS.items()}, REFS)
    assert same.cider_d == pytest.approx(10.0, abs=1e-9)
    assert same.per_image_cider_d == pytest.approx({"img1": 10.0, "img2": 10.0, "img3": 10.0}, abs=1e-9)
    disjoint = caption_scores({k: "purple elephants juggle loudly today" for k in REFS}, REFS)
    assert disjoint.cider_d == 0.0
    assert disjoint.per_image_cider_d == {"img1": 0.0, "img2": 0.0, "img3": 0.0}


def test_cider_d_partial_overlap_ranks_between_and_stays_in_0_10(no_java):
    # img2 shares most words; img3 shares only "two" ("a" is in every image: idf 0)
    cands = {"img1": "a dog runs on the beach", "img2": "a red car in the city", "img3": "two dogs nap"}
    scores = caption_scores(cands, REFS).per_image_cider_d
    assert all(0.0 <= s <= 10.0 for s in scores.values())
    assert scores["img1"] > scores["img2"] > scores["img3"] > 0.0


def test_cider_d_hand_value_with_length_penalty(no_java):
    # 2 images, each n-gram in one image's references: idf = log 2 for all, so weights are equal.
    # "x" vs "x y": unigram cosine 1/sqrt(2), no bigram (0); lengths differ by one bigram, so the
    # sigma = 6 penalty is exp(-1 / 72). Score 10 * (1/sqrt(2) * exp(-1/72)) / 4.
    # "p q" vs "p q": unigram and bigram cosines 1, no 3- or 4-grams: 10 * (1 + 1) / 4 = 5.
    s = caption_scores({"1": "x", "2": "p q"}, {"1": ["x y"], "2": ["p q"]})
    expected_1 = 10 * math.exp(-1 / 72) / math.sqrt(2) / 4
    assert s.per_image_cider_d["1"] == pytest.approx(expected_1, rel=1e-9)
    assert s.per_image_cider_d["2"] == pytest.approx(5.0, rel=1e-9)
    assert s.cider_d == pytest.approx((expected_1 + 5.0) / 2, rel=1e-9)


def test_bleu4_of_exact_match_is_1(no_java):
    refs = {"a": ["a dog runs on the beach", "a brown dog on sand"], "b": ["a red bus in the city"]}
    s = caption_scores({"a": "a dog runs on the beach", "b": "a red bus in the city"}, refs)
    assert s.bleu4 == pytest.approx(1.0, abs=1e-6)
    assert s.rouge_l == pytest.approx(1.0, abs=1e-12)


def test_rouge_l_hand_value(no_java):
    # "dog cat bird" vs "dog bird fish tree": LCS 2, P = 2/3, R = 1/2, beta = 1.2:
    # F = (1 + 1.44) P R / (R + 1.44 P) = 0.813333 / 1.46; the second image matches exactly (1.0)
    s = caption_scores({"1": "dog cat bird", "2": "red bus"}, {"1": ["dog bird fish tree"], "2": ["red bus"]})
    f = (1 + 1.44) * (2 / 3) * (1 / 2) / (1 / 2 + 1.44 * 2 / 3)
    assert s.rouge_l == pytest.approx((f + 1.0) / 2, rel=1e-9)


def test_empty_candidate_scores_zero(no_java):
    s = caption_scores({"img1": "", "img2": "a red bus in the city", "img3": "two cats sleep on a sofa"}, REFS)
    assert s.per_image_cider_d["img1"] == 0.0
    assert s.per_image_cider_d["img2"] == pytest.approx(10.0, abs=1e-9)


def test_meteor_and_spice_are_skipped_without_java(no_java):
    s = caption_scores({k: v[0] for k, v in REFS.items()}, REFS)
    assert s.tokenizer == "python-ptb-approximation"
    assert s.meteor is None and s.spice is None
    assert set(s.skipped) == {"METEOR", "SPICE"}
    assert s.skipped["METEOR"] == "needs Java (java not on PATH)"
    assert "java not on PATH" in s.skipped["SPICE"] and "download" in s.skipped["SPICE"]


def test_spice_is_skipped_offline_when_its_models_are_absent(monkeypatch):
    # Java "present", but METEOR stubbed and SPICE's CoreNLP jars missing: only SPICE is skipped
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: "/opt/java/bin/java")
    python_only = lambda caps: {k: [m.python_ptb_tokenize(c) for c in v] for k, v in caps.items()}  # noqa: E731
    monkeypatch.setattr(m, "_java_ptb_tokenize", python_only)
    monkeypatch.setattr(m, "_meteor", lambda gts, res: (0.25, None))
    monkeypatch.setattr(m, "_spice_models_present", lambda: False)
    s = caption_scores({k: v[0] for k, v in REFS.items()}, REFS)
    assert s.tokenizer == "ptb" and s.meteor == 0.25 and s.spice is None
    assert list(s.skipped) == ["SPICE"] and "fails offline" in s.skipped["SPICE"]


def test_caption_inputs_are_checked(no_java):
    with pytest.raises(VLMetricError, match="'img3'") as info:
        caption_scores({"img1": "a", "img2": "b"}, REFS)
    assert isinstance(info.value, AAPEError) and isinstance(info.value, ValueError)
    with pytest.raises(VLMetricError, match="'extra'"):
        caption_scores({**{k: "a" for k in REFS}, "extra": "b"}, REFS)
    with pytest.raises(VLMetricError, match="'img2'"):
        caption_scores({k: "a" for k in REFS}, {**REFS, "img2": []})
    with pytest.raises(VLMetricError, match="no images"):
        caption_scores({}, {})


# --------------------------------------------------------------------------------------------------
# CLIP-S and RefCLIP-S
# --------------------------------------------------------------------------------------------------

def _unit_at(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_prefix_is_clipscores():
    assert CLIP_S_PREFIX == "A photo depicts "
    assert with_prefix(["a dog.", "two cats"]) == ["A photo depicts a dog.", "A photo depicts two cats"]


def test_clip_s_hand_values_without_unit_inputs():
    image = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    caption = torch.tensor([[3.0, 4.0], [-0.6, 0.8]])  # cos 0.6, then cos -0.6
    assert clip_s(image, caption).tolist() == pytest.approx([2.5 * 0.6, 0.0], abs=1e-6)
    assert clip_s(image, caption, w=1.0).tolist() == pytest.approx([0.6, 0.0], abs=1e-6)


def test_ref_clip_s_harmonic_mean_ignores_padding():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    angle = math.degrees(math.acos(0.6))  # candidate at cos 0.6 from the image: CLIP-S 1.5
    candidate = torch.tensor([_unit_at(angle), _unit_at(angle)])
    # image 0: one reference at cos 0.5 (60 degrees away); its padding row equals the candidate (cos 1)
    # image 1: both rows valid, so the cos-1 row wins: harmonic mean of 1.5 and 1
    refs = torch.tensor([[_unit_at(angle + 60), _unit_at(angle)], [_unit_at(angle + 60), _unit_at(angle)]])
    got = ref_clip_s(image, candidate, refs * 3.0, torch.tensor([1, 2]))
    assert got.tolist() == pytest.approx([2 * 1.5 * 0.5 / 2.0, 2 * 1.5 * 1.0 / 2.5], abs=1e-6)


def test_ref_clip_s_with_a_zero_term_is_zero_not_nan():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    candidate = torch.tensor([[-1.0, 0.0], [-1.0, 0.0]])  # CLIP-S 0 for both
    refs = torch.tensor([[[1.0, 0.0]], [_unit_at(120)]])  # text side: cos -1 -> 0; cos 0.5
    got = ref_clip_s(image, candidate, refs, torch.tensor([1, 1]))
    assert got.tolist() == [0.0, 0.0]


def test_ref_clip_s_checks_counts_and_shapes():
    image = candidate = torch.ones(2, 4)
    with pytest.raises(VLMetricError, match="image 1"):
        ref_clip_s(image, candidate, torch.ones(2, 3, 4), torch.tensor([1, 0]))
    with pytest.raises(VLMetricError, match="reference_emb"):
        ref_clip_s(image, candidate, torch.ones(2, 4), torch.tensor([1, 1]))
    with pytest.raises(VLMetricError, match="clip_s"):
        clip_s(torch.ones(2, 4), torch.ones(3, 4))


# --------------------------------------------------------------------------------------------------
# VQA accuracy
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, normalized", [
    ("Two", "2"), ("the dog.", "dog"), ("dont", "don't"), ("Yes!", "yes"), ("3.5", "3.5"),
    ("1,000", "1000"), ("  Red\tcircle\n", "red circle"), ("t-shirt", "t shirt"), ("a none", "0"),
])
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_accuracy_leave_one_out():
    # 3 of 10 match: each matching answer sees 2 others (2/3), each other answer sees 3 (1)
    assert vqa_accuracy("dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    # 1 of 10: the matching answer sees 0 others, each of the 9 others sees 1 (1/3)
    assert vqa_accuracy("dog", ["dog"] + ["cat"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("dog", ["cat"] * 10) == 0.0
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0  # normalised on both sides


def test_vqa_accuracy_single_answer_is_exact_match():
    assert vqa_accuracy("The Circle.", ["circle"]) == 1.0
    assert vqa_accuracy("square", ["circle"]) == 0.0
    with pytest.raises(VLMetricError, match="no ground-truth answers"):
        vqa_accuracy("circle", [])


def test_truncate_answer():
    assert truncate_answer("red circle and more", ["red", "blue circle"]) == "red circle"
    assert truncate_answer("yes\nQuestion: is it", ["no", "yes it is"]) == "yes"
    assert truncate_answer("\n blue", ["red"]) == "blue"


def test_vqa_score_mean_and_per_question():
    mean, per = vqa_score({"q1": "red", "q2": "dog", "q3": "no"},
                          {"q1": ["red"], "q2": ["dog"] + ["cat"] * 9, "q3": ["yes"]})
    assert per == pytest.approx({"q1": 1.0, "q2": 0.3, "q3": 0.0})
    assert mean == pytest.approx(1.3 / 3)
    with pytest.raises(VLMetricError, match="'q2'"):
        vqa_score({"q1": "red"}, {"q1": ["red"], "q2": ["blue"]})
