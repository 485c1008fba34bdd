"""Captioning and VQA metrics: CIDEr-D, BLEU-4, ROUGE-L (and METEOR, SPICE where Java allows),
CLIP-S and RefCLIP-S, and the VQA accuracy.

Sources (facts carried over, code our own):
- pycocoevalcap 1.2 (PyPI; github.com/salaniz/pycocoevalcap, the Python 3 port of tylin/coco-caption,
  the MS-COCO caption server's code). What its source says, read in the installed copy:
  * cider/cider_scorer.py is CIDEr-D (Vedantam et al., CVPR 2015): a Gaussian length penalty with
    sigma = 6.0, clipped n-gram weights (min(candidate, reference) in the dot product), n = 1..4
    averaged, divided by the number of references, times 10. The idf comes from the references of the
    corpus passed in (log of the number of images), so score a split in ONE call: a one-image corpus
    gives every n-gram idf 0 and CIDEr-D 0. The "length" in the penalty counts bigrams (its
    `n == 1` is the bigram index), which equals the word-count difference for non-empty captions.
  * bleu/bleu.py: corpus BLEU with option "closest" reference length (brevity penalty),
    BLEU-4 = its 4th value; bleu_scorer.py adds 1e-15 / 1e-9 so exact matches give 1 - O(1e-9).
  * rouge/rouge.py: ROUGE-L F-measure with beta = 1.2, max LCS precision and recall over the
    references, averaged over images.
  * tokenizer/ptbtokenizer.py: Stanford CoreNLP 3.4.1's PTBTokenizer (`java`, bundled jar) with
    -preserveLines -lowerCase, then drops the tokens in PTB_DROPPED. Because of -lowerCase the
    brackets come out as -lrb- / -rrb- (lower case) and are NOT dropped: the drop list is upper case.
  * meteor/meteor.py runs the bundled meteor-1.5.jar (java -Xmx2G); spice/spice.py runs
    spice-1.0.jar (java -Xmx8G) and first downloads CoreNLP 3.6.0 jars into spice/lib/
    (get_stanford_models.py, from nlp.stanford.edu), which fails offline.
  * eval.py (COCOEvalCap) tokenizes references and candidates, then passes the tokens to every scorer;
    caption_scores does the same.
- CLIPScore: Hessel et al., "CLIPScore: A Reference-free Evaluation Metric for Image Captioning",
  EMNLP 2021, and github.com/jmhessel/clipscore (clipscore.py): the prefix "A photo depicts " before
  candidates and references, CLIP-S = 2.5 * max(cos, 0), RefCLIP-S = the harmonic mean of CLIP-S and
  the text side max(max_r cos(c, r), 0).
- VQA accuracy: github.com/GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py
  (commit a013f00): answer processing (punctuation, number words, articles, contractions) and the
  leave-one-out min(1, #matches / 3) averaged over the human answers.
- Answer truncation: the AAPE paper, following MAGMA (Eichenberg et al., 2022) and Frozen
  (Tsimpoukelli et al., 2021): "generation truncated to the length of the longest ground-truth answer".

Scales: CIDEr-D, BLEU-4, ROUGE-L, METEOR and SPICE are returned on pycocoevalcap's raw scale
(CIDEr-D in [0, 10], e.g. 1.05; the others in [0, 1]); CLIP-S in [0, 2.5]; VQA accuracy in [0, 1].
The report layer multiplies by 100 where the field prints percentages.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Mapping, Sequence, TypeVar

import torch
import torch.nn.functional as F

from aape.errors import AAPEError

K = TypeVar("K", bound=Hashable)

_SHOW = 3  # keys named in a mismatch message


class VLMetricError(AAPEError, ValueError):
    """Metric inputs are inconsistent; the message names the culprit and what to do."""


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------

# pycocoevalcap/tokenizer/ptbtokenizer.py PUNCTUATIONS: tokens removed after PTB tokenization
PTB_DROPPED = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                         ".", "?", "!", ",", ":", "-", "--", "...", ";"])
PTB = "ptb"
PYTHON_PTB = "python-ptb-approximation"

# What CoreNLP 3.4.1's PTBTokenizer -lowerCase does, observed on sample captions (the test compares
# against the real one when Java is present): brackets become -lrb- etc. (kept: the drop list is upper
# case), curly quotes become ASCII, a few words split in two, titles and initials keep their period.
_PTB_FORMS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}
_ASCII = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2026": "..."})
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "gimme": ("gim", "me"), "lemme": ("lem", "me")}
_KEEP_PERIOD = re.compile(r"^(?:[a-z]\.)+$|^(?:mr|mrs|ms|dr|st|jr|sr|vs)\.$")
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_ALWAYS_SPLIT = re.compile(r"(\.\.\.|--|[?!]+|[;\"()\[\]{}*=+$%]|#(?=\d))")
_SPLIT_OFF_DIGITS = re.compile(r"(?<!\d)([,:])|([,:])(?!\d)")  # 1,000 and 5:30 stay whole


def java_available() -> bool:
    """Java on PATH: the PTB tokenizer, METEOR and SPICE need it (looked up on every call)."""
    return shutil.which("java") is not None


def _ptb_like_tokens(token: str) -> list[str]:
    """One whitespace-separated piece -> PTB tokens: quotes, hyphens, periods and clitics split off."""
    if token in _PTB_FORMS:
        return [_PTB_FORMS[token]]
    if token in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[token])
    if token in _CLITICS:
        return [token]
    head: list[str] = []
    tail: list[str] = []
    while len(token) > 1 and token[0] in "'`-" and not re.match(r"'\d", token):
        head.append("`" if token[0] in "'`" else "-")
        token = token[1:]
    while len(token) > 1 and token[-1] in "'-." and not _KEEP_PERIOD.match(token):
        tail.insert(0, token[-1])
        token = token[:-1]
    clitic = _CLITIC.match(token)
    core = [clitic.group(1), clitic.group(2)] if clitic else [token]
    return head + core + tail


def python_ptb_tokenize(caption: str) -> str:
    """A pure-Python stand-in for pycocoevalcap's PTBTokenizer on plain English captions: lowercase,
    split off punctuation and clitics as PTB does, drop the tokens pycocoevalcap drops."""
    text = caption.translate(_ASCII).lower()
    text = _SPLIT_OFF_DIGITS.sub(lambda m: f" {m.group(0)} ", _ALWAYS_SPLIT.sub(r" \1 ", text))
    tokens = [t for piece in text.split() for t in _ptb_like_tokens(piece)]
    return " ".join(t for t in tokens if t not in PTB_DROPPED)


def _java_ptb_tokenize(captions: Mapping[K, list[str]]) -> dict[K, list[str]]:
    """pycocoevalcap's PTBTokenizer, with each caption's whitespace (line breaks too) collapsed first:
    it joins captions with newlines and maps output lines back by position."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    cleaned = {k: [{"caption": " ".join(c.split())} for c in v] for k, v in captions.items()}
    out = PTBTokenizer().tokenize(cleaned)
    for key, caps in captions.items():
        if len(out.get(key, [])) != len(caps):
            raise VLMetricError(f"PTBTokenizer returned {len(out.get(key, []))} captions for {key!r}, "
                                f"expected {len(caps)}; check that `java -version` works")
    return out


def _tokenize(captions: Mapping[K, list[str]], use_java: bool = True) -> tuple[dict[K, list[str]], str]:
    if use_java and java_available():
        return _java_ptb_tokenize(captions), PTB
    return {k: [python_ptb_tokenize(c) for c in v] for k, v in captions.items()}, PYTHON_PTB


def tokenize(captions: dict[str, list[str]]) -> tuple[dict[str, list[str]], str]:
    """Tokenize captions as the COCO caption evaluation does: PTBTokenizer when `java` is on PATH
    ("ptb"), else the pure-Python approximation ("python-ptb-approximation"). Returns the tokens
    (space-joined, per key, in order) and that name, for reports to state."""
    return _tokenize(captions)


# --------------------------------------------------------------------------------------------------
# Caption scores (pycocoevalcap)
# --------------------------------------------------------------------------------------------------

NO_JAVA = "needs Java (java not on PATH)"


@dataclass(frozen=True)
class CaptionScores:
    """Corpus-level caption metrics on pycocoevalcap's raw scale (CIDEr-D in [0, 10], others in
    [0, 1]); `skipped` maps each metric not computed ("METEOR", "SPICE") to why."""

    cider_d: float
    bleu4: float
    rouge_l: float
    per_image_cider_d: dict[str, float]
    tokenizer: str
    meteor: float | None = None
    spice: float | None = None
    skipped: dict[str, str] = field(default_factory=dict)


def _mismatch(what: str, left: set[str], right: set[str], left_name: str, right_name: str) -> None:
    """Raise naming one key that is in one mapping and not the other."""
    for a, b, a_name, b_name in ((left, right, left_name, right_name), (right, left, right_name, left_name)):
        extra = sorted(a - b)
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise VLMetricError(f"{what}: {extra[0]!r}{more} has {a_name} but no {b_name}; "
                                f"pass the same keys in both")


def _check_captions(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> None:
    _mismatch("caption scores", set(candidates), set(references), "a candidate", "references")
    if not references:
        raise VLMetricError("caption scores: no images given; pass at least two (CIDEr-D's idf needs a corpus)")
    for key, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise VLMetricError(f"caption scores: image {key!r} needs a list of at least one reference caption")
        if any(not isinstance(r, str) or not r.strip() for r in refs):
            raise VLMetricError(f"caption scores: image {key!r} has an empty or non-string reference; drop it")
        if not isinstance(candidates[key], str):
            raise VLMetricError(f"caption scores: the candidate of {key!r} is not a string; pass one caption per image")


def _spice_models_present() -> bool:
    """SPICE's CoreNLP jars in pycocoevalcap/spice/lib/: without them Spice() tries to download."""
    from pycocoevalcap.spice import get_stanford_models as models

    lib = Path(models.SPICEDIR) / models.SPICELIB
    return all((lib / f"{models.JAR}{suffix}.jar").exists() for suffix in ("", "-models"))


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float | None, str | None]:
    """METEOR 1.5 through its Java process, which is ended here rather than left to garbage collection."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
        return float(score), None
    except (OSError, ValueError) as exc:  # a dead java process shows as an empty line -> ValueError
        return None, f"METEOR's java process failed ({exc}); run `java -jar meteor-1.5.jar` to see why"
    finally:
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()


def _spice(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float | None, str | None]:
    from pycocoevalcap.spice.spice import Spice

    try:
        score, _ = Spice().compute_score(gts, res)
        return float(score), None
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, f"SPICE's java process failed ({exc}); SPICE 1.0 is documented for Java 8"


JAVA_OFF = "turned off (prefix.java_metrics: false)"


def _java_metrics(gts: dict[str, list[str]], res: dict[str, list[str]],
                  use_java: bool = True) -> tuple[dict[str, float | None], dict[str, str]]:
    """METEOR and SPICE when they can run offline, else the reason each is skipped."""
    if not use_java:
        return {}, {"METEOR": JAVA_OFF, "SPICE": JAVA_OFF}
    if not java_available():
        return {}, {"METEOR": NO_JAVA, "SPICE": f"{NO_JAVA}; it also downloads CoreNLP 3.6.0 on first use"}
    scores: dict[str, float | None] = {}
    skipped: dict[str, str] = {}
    scores["METEOR"], why = _meteor(gts, res)
    if why:
        skipped["METEOR"] = why
    if not _spice_models_present():
        skipped["SPICE"] = ("its CoreNLP 3.6.0 jars are not in pycocoevalcap/spice/lib/ and it would download "
                            "them from nlp.stanford.edu (fails offline); run pycocoevalcap.spice."
                            "get_stanford_models once online to enable it")
        return scores, skipped
    scores["SPICE"], why = _spice(gts, res)
    if why:
        skipped["SPICE"] = why
    return scores, skipped


def caption_scores(candidates: dict[str, str], references: dict[str, list[str]], use_java: bool = True) -> CaptionScores:
    """CIDEr-D, BLEU-4 and ROUGE-L (pure Python), plus METEOR and SPICE when Java (and for SPICE its
    downloaded models) allow, of one candidate per image against its references, all tokenized as the
    COCO evaluation does. Pass the whole split at once: CIDEr-D's idf is computed over it. An empty
    candidate is allowed and scores 0. Raw pycocoevalcap scale: CIDEr-D in [0, 10], others in [0, 1].
    `use_java=False` takes the Python tokenizer and skips METEOR and SPICE even where Java is present
    (each Java start costs seconds: tests, quick runs)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check_captions(candidates, references)
    keys = list(references)
    # one tokenizer call (one JVM start) for both sides
    merged = {("ref", k): list(references[k]) for k in keys} | {("cand", k): [candidates[k]] for k in keys}
    tokens, tokenizer = _tokenize(merged, use_java)
    gts = {k: tokens[("ref", k)] for k in keys}
    res = {k: tokens[("cand", k)] for k in keys}
    cider, per_image = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    java_scores, skipped = _java_metrics(gts, res, use_java)
    return CaptionScores(
        cider_d=float(cider), bleu4=float(bleu[3]), rouge_l=float(rouge),
        per_image_cider_d={k: float(s) for k, s in zip(keys, per_image)}, tokenizer=tokenizer,
        meteor=java_scores.get("METEOR"), spice=java_scores.get("SPICE"), skipped=skipped,
    )


# --------------------------------------------------------------------------------------------------
# CLIP-S and RefCLIP-S (Hessel et al., 2021)
# --------------------------------------------------------------------------------------------------

CLIP_S_PREFIX = "A photo depicts "  # clipscore.py's CLIPCapDataset default, with its added space
CLIP_S_WEIGHT = 2.5  # the paper's w; clipscore.py's get_clip_score(w=2.5)


def with_prefix(captions: list[str]) -> list[str]:
    """Captions as CLIPScore feeds them to CLIP's text encoder, candidates and references alike."""
    return [CLIP_S_PREFIX + c for c in captions]


def _check_rows(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise VLMetricError(f"{name}: expected two [N, d] tensors of one shape, got {tuple(a.shape)} and "
                            f"{tuple(b.shape)}; pass one embedding row per image")


def _unit(x: torch.Tensor) -> torch.Tensor:
    # float32: CLIP on GPU yields float16, whose rounding clipscore.py warns changes the scores
    return F.normalize(x.float(), dim=-1)


def clip_s(image_emb: torch.Tensor, caption_emb: torch.Tensor, w: float = CLIP_S_WEIGHT) -> torch.Tensor:
    """CLIP-S per image, [N]: w * max(cos(image, caption), 0); inputs need not be unit vectors."""
    _check_rows("clip_s", image_emb, caption_emb)
    cos = (_unit(image_emb) * _unit(caption_emb)).sum(dim=-1)
    return w * cos.clamp_min(0.0)


def _check_references(reference_emb: torch.Tensor, reference_counts: torch.Tensor, n: int, d: int) -> None:
    if reference_emb.dim() != 3 or reference_emb.shape[0] != n or reference_emb.shape[2] != d:
        raise VLMetricError(f"ref_clip_s: reference_emb must be [N={n}, R, d={d}], got {tuple(reference_emb.shape)}; "
                            f"pad each image's references to R rows")
    if reference_counts.shape != (n,) or reference_counts.is_floating_point():
        raise VLMetricError(f"ref_clip_s: reference_counts must be an integer [N={n}] tensor, got "
                            f"{reference_counts.dtype} {tuple(reference_counts.shape)}")
    bad = ((reference_counts < 1) | (reference_counts > reference_emb.shape[1])).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise VLMetricError(f"ref_clip_s: image {i} has reference count {int(reference_counts[i])}, outside "
                            f"1..R={reference_emb.shape[1]}; give every image at least one reference")


def ref_clip_s(image_emb: torch.Tensor, candidate_emb: torch.Tensor, reference_emb: torch.Tensor,
               reference_counts: torch.Tensor, w: float = CLIP_S_WEIGHT) -> torch.Tensor:
    """RefCLIP-S per image, [N]: the harmonic mean of CLIP-S and max(max_r cos(candidate, r), 0) over
    the image's first reference_counts[i] rows of reference_emb [N, R, d] (the rest is padding).
    The paper clips the text side at 0; clipscore.py does not, which only differs when every
    reference is anti-correlated with the candidate. A harmonic mean with a 0 term is 0."""
    _check_rows("ref_clip_s", image_emb, candidate_emb)
    n, d = candidate_emb.shape
    _check_references(reference_emb, reference_counts, n, d)
    image_side = clip_s(image_emb, candidate_emb, w)
    sims = torch.einsum("nd,nrd->nr", _unit(candidate_emb), _unit(reference_emb))
    valid = torch.arange(reference_emb.shape[1], device=sims.device) < reference_counts.to(sims.device)[:, None]
    text_side = sims.masked_fill(~valid, float("-inf")).amax(dim=1).clamp_min(0.0)
    total = image_side + text_side
    # both terms are >= 0, so total == 0 means both are 0: divide by 1 there instead of 0
    return 2 * image_side * text_side / torch.where(total > 0, total, torch.ones_like(total))


# --------------------------------------------------------------------------------------------------
# VQA accuracy (GT-Vision-Lab/VQA, vqaEval.py)
# --------------------------------------------------------------------------------------------------

# vqaEval.py's contractions, verbatim (keys with capitals, e.g. "Im", never match after its
# lowercasing, and "somebody'd" -> "somebodyd" is its own typo: both kept so scores agree with it)
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# vqaEval.py's manualMap, articles, periodStrip, commaStrip and punct, as it defines them
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset(["a", "an", "the"])
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a lookahead, so any '.' not before a digit
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP_COUNT = re.UNICODE.value  # vqaEval passes re.UNICODE as sub's count: at most 32 periods go


def _process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: each mark is deleted when it touches a space (or the text holds a
    digit,digit group), else replaced by a space; then periods not before a digit go."""
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lowercase, number words to digits, drop articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """An answer as vqaEval.py compares it: whitespace, punctuation, then digits/articles/contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy in [0, 1] of one prediction against the human answers, all normalised.

    Two or more answers: vqaEval.py's leave-one-out mean over answers i of min(1, #(other answers equal
    to the prediction) / 3). One answer (easy-VQA has one per question): exact match, 1.0 or 0.0,
    since the leave-one-out form would leave no other answer and score a correct prediction 0.
    Unlike vqaEval.py, which skips normalisation when all human answers are identical, both sides are
    always normalised: a generated "Two." must match ten human "2"s.
    """
    if isinstance(answers, str) or not answers:
        raise VLMetricError(f"vqa accuracy: no ground-truth answers for prediction {prediction!r}; "
                            f"pass a list of at least one answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    matches = sum(g == pred for g in gts)
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)


def truncate_answer(generated: str, answers: Sequence[str]) -> str:
    """A generation cut at its first newline, then to as many words as the longest ground-truth answer.
    Leading whitespace goes first, so a generation that starts with a newline keeps its answer."""
    if isinstance(answers, str) or not answers:
        raise VLMetricError("truncate_answer: no ground-truth answers; pass a list of at least one answer")
    limit = max(len(a.split()) for a in answers)
    first_line = generated.lstrip().split("\n", 1)[0]
    return " ".join(first_line.split()[:limit])


def vqa_score(predictions: dict[str, str], answers: dict[str, list[str]]) -> tuple[float, dict[str, float]]:
    """Mean VQA accuracy in [0, 1] over the questions, and each question's accuracy."""
    _mismatch("vqa score", set(predictions), set(answers), "a prediction", "answers")
    if not answers:
        raise VLMetricError("vqa score: no questions given; pass at least one prediction and its answers")
    per_question = {q: vqa_accuracy(predictions[q], answers[q]) for q in answers}
    return sum(per_question.values()) / len(per_question), per_question
