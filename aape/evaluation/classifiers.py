"""Every method under evaluation as one kind of object: features of images -> logits over classes.

A classifier scores a batch of L2-normalised image features against a list of *global* class
labels and returns logits in that list's order. Baselines are computed from the cached feature
tensors (no encoder runs here):

- zero-shot:           the text embedding of "a photo of a {class}."
- zero-shot ensemble:  the mean of the template ensemble's embeddings, re-normalised
- CuPL:                the mean of the class's description embeddings, re-normalised
- linear probe:        multinomial logistic regression on the same few shots (their clean
                       features), full-batch L-BFGS from zero (deterministic), L2 strength
                       chosen on validation from evaluation.linear_probe_c_grid
- AAPE:                the trained generator with the fast head (`model.logits`)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class NotApplicable(Exception):
    """This method cannot score these classes (e.g. a linear probe on classes it never saw)."""


class EvaluationError(ValueError):
    """Evaluation inputs are inconsistent; the message names the culprit and what to do."""


class Classifier(Protocol):
    name: str

    def logits(self, features: torch.Tensor, classes: Sequence[int]) -> torch.Tensor: ...


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

    def logits(self, features: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
        position = {c: i for i, c in enumerate(self.trained_classes)}
        unseen = [c for c in classes if c not in position]
        if unseen:
            raise NotApplicable(
                f"a linear probe has no weights for the {len(unseen)} class(es) it never saw in training"
            )
        rows = torch.as_tensor([position[c] for c in classes], dtype=torch.long)
        return features @ self.weights[rows].T + self.bias[rows]


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, sklearn's objective (C·Σ CE + ½‖W‖², bias not penalised)
    divided by C·n, minimised by full-batch L-BFGS in float64 from zero: deterministic."""
    n, d = x.shape
    weight = torch.zeros(num_classes, d, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
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
    c_grid: Sequence[float],
    max_iter: int = 300,
) -> LinearProbe:
    """Fit one probe per C on the training shots, keep the C with the best validation accuracy.

    Ties go to the smallest C (strongest regularisation). With no validation images the middle of
    the grid is used (and logged)."""
    classes = sorted(int(c) for c in torch.unique(train_labels))
    if len(classes) < 2:
        raise EvaluationError(f"a linear probe needs at least 2 training classes, got {classes}")
    grid = sorted(float(c) for c in c_grid)
    if not grid:
        raise EvaluationError("evaluation.linear_probe_c_grid is empty; give at least one value, e.g. [1.0]")
    position = {c: i for i, c in enumerate(classes)}
    x = train_features.double()
    y = torch.as_tensor([position[int(c)] for c in train_labels], dtype=torch.long)
    known_val = torch.isin(val_labels, torch.as_tensor(classes))
    xv = val_features[known_val].double()
    yv = torch.as_tensor([position[int(c)] for c in val_labels[known_val]], dtype=torch.long)
    fits: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    if len(yv) == 0:
        chosen, best_acc = grid[len(grid) // 2], float("nan")
        log.warning("linear probe: no validation images; using C=%g without selection", chosen)
    else:
        chosen, best_acc = grid[0], -1.0
        for c in grid:
            fits[c] = _fit_logistic(x, y, len(classes), c, max_iter)
            weight, bias = fits[c]
            acc = 100.0 * ((xv @ weight.T + bias).argmax(-1) == yv).double().mean().item()
            log.debug("linear probe C=%g: val accuracy %.2f", c, acc)
            if acc > best_acc:
                chosen, best_acc = c, acc
    weight, bias = fits[chosen] if chosen in fits else _fit_logistic(x, y, len(classes), chosen, max_iter)
    log.info("linear probe: C=%g chosen on validation (accuracy %.2f%%)", chosen, best_acc)
    return LinearProbe(weight.float(), bias.float(), classes, chosen, best_acc)


@dataclass
class ModelClassifier:
    """A trained AAPE generator (anything with `logits(image_feats, class_text)`), fast head."""

    name: str
    model: object
    class_text: torch.Tensor  # [C, d] "a photo of a {}." per global class

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
