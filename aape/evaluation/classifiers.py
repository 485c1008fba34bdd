"""Every method under evaluation as one kind of object: features of images -> logits over classes.

A classifier scores a batch of L2-normalised image features against a list of *global* class
labels and returns logits in that list's order. Baselines are computed from the cached feature
tensors (no encoder runs here):

- zero-shot:           the text embedding of the dataset's zero-shot template (CoOp's, by default)
- zero-shot ensemble:  the mean of the template ensemble's embeddings (CLIP's set), re-normalised
- CuPL:                the mean of the class's description embeddings, re-normalised
- linear probe:        multinomial logistic regression on the same few shots (their clean
                       features), full-batch L-BFGS (deterministic), its C searched on validation
                       as CLIP's paper and CoOp's lpclip do (`CSearch`)
- AAPE:                the trained generator with the fast head (`model.logits`)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from aape.errors import AAPEError
from aape.labels import local_positions, to_local

if TYPE_CHECKING:
    from aape.config import EvaluationConfig

log = logging.getLogger(__name__)


class NotApplicable(Exception):
    """This method cannot score these classes (e.g. a linear probe on classes it never saw)."""


class EvaluationError(AAPEError, ValueError):
    """Evaluation inputs are inconsistent; the message names the culprit and what to do."""


class Classifier(Protocol):
    name: str

    def logits(self, features: torch.Tensor, classes: Sequence[int]) -> torch.Tensor: ...


@dataclass
class Unavailable:
    """A method that cannot run on this data; every set it is asked about is reported n/a with `reason`."""

    name: str
    reason: str

    def logits(self, features: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
        raise NotApplicable(self.reason)


@dataclass
class TextClassifier:
    """Cosine similarity to one embedding per class, times CLIP's logit scale."""

    name: str
    class_weights: torch.Tensor  # [C, d], row i = global class i
    logit_scale: float

    def logits(self, features: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
        weights = self.class_weights[torch.as_tensor(list(classes), dtype=torch.long)]
        return self.logit_scale * features @ weights.T


def zeroshot(class_prompts: torch.Tensor, logit_scale: float) -> TextClassifier:
    return TextClassifier("zeroshot", F.normalize(class_prompts, dim=-1), logit_scale)


def zeroshot_ensemble(class_ensemble: torch.Tensor, logit_scale: float) -> TextClassifier:
    return TextClassifier("zeroshot-ensemble", F.normalize(class_ensemble, dim=-1), logit_scale)


def cupl_class_embeddings(
    descriptions: torch.Tensor, description_class: torch.Tensor, num_classes: int, classnames: Sequence[str] | None = None
) -> torch.Tensor:
    """[C, d]: per class, the mean of its description embeddings, re-normalised.

    Every class must have at least one description; otherwise CuPL is undefined for it and the
    error names the classes (regenerate prompts or lower prompts.min_per_class filtering)."""
    labels = description_class.long()
    counts = torch.bincount(labels, minlength=num_classes)[:num_classes]
    if labels.numel() and int(labels.max()) >= num_classes:
        raise EvaluationError(
            f"description_class holds label {int(labels.max())} but there are only {num_classes} classes: "
            f"text features and classes.json disagree; re-run `aape extract-features`."
        )
    empty = [int(c) for c in torch.nonzero(counts == 0).flatten()]
    if empty:
        named = [classnames[c] if classnames and c < len(classnames) else str(c) for c in empty]
        raise EvaluationError(
            f"CuPL needs descriptions for every class, but none exist for: {', '.join(named)}. "
            f"Re-run `aape generate-prompts` (or fix prompts.file) so every class has descriptions."
        )
    sums = torch.zeros(num_classes, descriptions.shape[1], dtype=descriptions.dtype)
    sums.index_add_(0, labels, descriptions)
    return F.normalize(sums / counts.unsqueeze(1).to(sums.dtype), dim=-1)


def cupl(descriptions: torch.Tensor, description_class: torch.Tensor, num_classes: int, logit_scale: float,
         classnames: Sequence[str] | None = None) -> TextClassifier:
    weights = cupl_class_embeddings(descriptions, description_class, num_classes, classnames)
    return TextClassifier("cupl", weights, logit_scale)


@dataclass
class LinearProbe:
    """Logistic regression weights for the classes it was trained on (global labels)."""

    weights: torch.Tensor  # [K, d]
    bias: torch.Tensor  # [K]
    trained_classes: list[int]
    regularisation_c: float
    val_accuracy: float
    name: str = "linear-probe"
    val_loss: float = float("nan")  # validation cross-entropy of the chosen C
    fits: int = 1  # logistic regressions fitted to choose C
    trials: list[tuple[float, float, float]] = field(default_factory=list)  # (C, val accuracy, val loss), in fit order

    def logits(self, features: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
        rows = local_positions(list(classes), self.trained_classes)
        unseen = int((rows < 0).sum())
        if unseen:
            raise NotApplicable(f"a linear probe has no weights for the {unseen} class(es) it never saw in training")
        rows = rows.to(self.weights.device)
        return features @ self.weights[rows].T + self.bias[rows]


@dataclass(frozen=True)
class CSearch:
    """The search for the linear probe's C (inverse L2 strength) on validation.

    CLIP's paper sweeps C log-spaced over 1e-6..1e6; CoOp's lpclip tries 1e-6..1e6 every two decades,
    then refines around the best by bisection in log space. Here: `coarse_points` log-spaced values over
    [low, high] (both ends included), then `refine_steps` steps that halve the step h and try
    best·10^±h, keeping the best. For a validation score with one peak in the range, the chosen C is
    within a factor `resolution` of the peak."""

    low: float = 1e-6
    high: float = 1e6
    coarse_points: int = 13
    refine_steps: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high:
            raise EvaluationError(f"linear probe C range must satisfy 0 < low < high, got [{self.low}, {self.high}]")
        if self.coarse_points < 2 or self.refine_steps < 0:
            raise EvaluationError(
                f"linear probe C search needs >= 2 coarse points and >= 0 refinement steps, "
                f"got {self.coarse_points} and {self.refine_steps}"
            )

    @classmethod
    def from_config(cls, cfg: "EvaluationConfig") -> "CSearch":
        low, high = cfg.linear_probe_c_range
        return cls(float(low), float(high), cfg.linear_probe_c_coarse_points, cfg.linear_probe_c_refine_steps)

    @property
    def spacing(self) -> float:
        """log10 distance between neighbouring coarse points."""
        return (math.log10(self.high) - math.log10(self.low)) / (self.coarse_points - 1)

    @property
    def resolution(self) -> float:
        return 10.0 ** (self.spacing / 2**self.refine_steps)

    @property
    def middle(self) -> float:
        """The geometric middle of the range: the C used when there is nothing to choose on."""
        return 10.0 ** ((math.log10(self.low) + math.log10(self.high)) / 2)

    def describe(self) -> str:
        return (f"{self.coarse_points} log-spaced C over [{self.low:g}, {self.high:g}], {self.refine_steps} refinement "
                f"steps (resolution x{self.resolution:.3g})")


Score = tuple[float, ...]


def log_scale_search(score: Callable[[float], Score], search: CSearch) -> tuple[float, dict[float, Score]]:
    """(best C, {C: score} of every C tried, in the order tried) maximising `score`.

    Scores are compared as tuples; equal scores go to the smaller C (stronger regularisation), so
    the outcome depends on nothing but the scores. Every C is scored once."""
    lo, hi = math.log10(search.low), math.log10(search.high)
    scores: dict[float, Score] = {}
    exponent: dict[float, float] = {}

    def trial(e: float) -> float:
        c = 10.0**e
        if c not in scores:
            scores[c] = tuple(score(c))
            exponent[c] = e
        return c

    def rank(c: float) -> tuple[float, ...]:
        return (*scores[c], -c)

    n = search.coarse_points
    coarse = [lo + (hi - lo) * i / (n - 1) for i in range(n - 1)] + [hi]  # both ends included
    best = max((trial(e) for e in coarse), key=rank)
    step = search.spacing
    for _ in range(search.refine_steps):
        step /= 2
        around = [exponent[best] - step, exponent[best] + step]
        best = max([best, *(trial(e) for e in around if lo <= e <= hi)], key=rank)
    return best, scores


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float, max_iter: int,
                  init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, sklearn's objective (C·Σ CE + ½‖W‖², bias not penalised)
    divided by C·n, minimised by full-batch L-BFGS in float64 from zero or from `init` (the fit of
    a nearby C: the objective is strictly convex in W, so a warm start only saves iterations)."""
    n, d = x.shape
    if init is None:
        weight = torch.zeros(num_classes, d, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    else:
        weight, bias = (t.detach().clone().requires_grad_(True) for t in init)
    optimiser = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7,
                                  tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + weight.pow(2).sum() / (2.0 * c * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(objective)
    return weight.detach(), bias.detach()


def train_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    search: CSearch | None = None,
    max_iter: int = 300,
) -> LinearProbe:
    """Fit probes on the training shots for the C values of `search` and keep the best on validation.

    Best = highest validation accuracy; ties (common with a few validation images) go to the lower
    validation cross-entropy, then to the smaller C. Each fit starts from the fit of the nearest C
    tried before it. With no validation images the middle of the range is used (and logged)."""
    search = search or CSearch()
    classes = sorted(int(c) for c in torch.unique(train_labels))
    if len(classes) < 2:
        raise EvaluationError(f"a linear probe needs at least 2 training classes, got {classes}")
    x = train_features.double()
    y = to_local(train_labels, classes)
    val_positions = local_positions(val_labels, classes)
    known_val = val_positions >= 0
    xv = val_features[known_val].double()
    yv = val_positions[known_val]
    if len(yv) == 0:
        chosen = search.middle
        weight, bias = _fit_logistic(x, y, len(classes), chosen, max_iter)
        log.warning("linear probe: no validation images; using C=%g (the middle of the range) without selection", chosen)
        return LinearProbe(weight.float(), bias.float(), classes, chosen, float("nan"), fits=1)

    fits: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

    def validation_score(c: float) -> Score:
        nearest = min(fits, key=lambda done: abs(math.log(done / c)), default=None)
        fits[c] = _fit_logistic(x, y, len(classes), c, max_iter, fits.get(nearest) if nearest is not None else None)
        logits = xv @ fits[c][0].T + fits[c][1]
        acc = 100.0 * (logits.argmax(-1) == yv).double().mean().item()
        loss = F.cross_entropy(logits, yv).item()
        log.debug("linear probe C=%.4g: val accuracy %.2f, cross-entropy %.4f", c, acc, loss)
        return acc, -loss

    chosen, scores = log_scale_search(validation_score, search)
    weight, bias = fits[chosen]
    best_acc, best_loss = scores[chosen][0], -scores[chosen][1]
    log.info("linear probe: C=%.4g chosen on validation (accuracy %.2f%%, cross-entropy %.4f) after %d fits; %s",
             chosen, best_acc, best_loss, len(fits), search.describe())
    trials = [(c, acc, -neg_loss) for c, (acc, neg_loss) in scores.items()]
    return LinearProbe(weight.float(), bias.float(), classes, chosen, best_acc, val_loss=best_loss, fits=len(fits),
                       trials=trials)


@dataclass
class ModelClassifier:
    """A trained AAPE generator (anything with `logits(image_feats, class_text)`), fast head."""

    name: str
    model: object
    class_text: torch.Tensor  # [C, d] features.class_template per global class

    def logits(self, features: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
        text = self.class_text[torch.as_tensor(list(classes), dtype=torch.long)]
        with torch.inference_mode():
            return self.model.logits(features, text)  # type: ignore[attr-defined]


def predict_in_batches(classifier: Classifier, features: torch.Tensor, classes: Sequence[int], batch_size: int) -> torch.Tensor:
    """Local class index (position in `classes`) of the highest logit, batch by batch."""
    predictions = [
        classifier.logits(features[start : start + batch_size], classes).argmax(dim=-1)
        for start in range(0, features.shape[0], batch_size)
    ]
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
