"""A world of synthetic embeddings that behaves like CLIP's, with a planted structure to recover.

Why each ingredient is there (docs/method.md, "The proxy benchmark", gives the sources):
- Two narrow cones. CLIP's image and text embeddings occupy two separate narrow cones, the
  "modality gap" (Liang et al., NeurIPS 2022): every embedding is `gap·μ + √(1−gap²)·content`
  with μ the modality's mean direction (μ_image and μ_text almost orthogonal). Matched image-text
  cosines land around 0.2-0.35, unmatched ones ~0.1 lower, as CLIPScore's statistics show for
  real pairs (Hessel et al., 2021), and logits are 100·cos (OpenAI CLIP's learnt logit scale).
- Imperfect alignment. Inside the class subspace the text side is a partly rotated copy of the
  image side (`misalignment`): contrastive training aligns the two modalities only up to a residual
  systematic distortion, the part of CLIP's error that one map, learnt on some classes, corrects for
  all (why a prompt learnt on base classes can transfer to new ones at all).
- Related classes. Class concepts share a low-rank structure (a `rank`-dimensional subspace holds
  `shared` of each concept's energy), so some classes are confusable, as fine-grained datasets are.
  Variation (sub-modes, image noise, prompt noise) lies partly in that subspace (`structured_noise`),
  so it moves an embedding towards related classes instead of into directions no class uses, and
  averaging many images or descriptions does not remove it all.
- Visual sub-modes shared across classes. An image shows its class in one of `modes` sub-modes,
  like a car's front or rear view: the same kinds of view exist for every class and change every
  class's appearance in a consistent way (`mode_shift`: sub-mode k applies one rotation of the class
  subspace to every class's concept), plus a class-specific part (`mode_spread`). A sub-mode also
  leaves a trace of its own, the same for every class (`mode_style`: a direction outside the class
  subspace, like snow on a winter satellite image), and its descriptions mention it. A class-name
  prompt describes no view in particular; an image matches one. What a view does transfers to new
  classes, which is what an image-conditioned classifier can exploit (CoCoOp's argument).
- Weak class-name prompts. "a photo of a {class}." is the concept plus noise (`template_noise`): the
  zero-shot classifier is good but far from perfect, and better on the new half in the `clip-like`
  preset, as on the 11 datasets (CLIP 69.34 base vs 74.22 new, CoCoOp's Table 1).
- Descriptions of four kinds per class, shuffled, all sharing one per-class bias
  (`description_bias`: what the LLM believes a class looks like is not exactly what its photos
  show, so even the mean of many descriptions errs): mode-specific ones (near one sub-mode), generic
  ones (near the concept), irrelevant boilerplate (near one direction shared by every class: "it is
  a common sight"), and wrong ones (near the most similar other class's concept, as an LLM that
  confuses two car models writes). CuPL's mean of them is a little better than the class-name
  prompt; an image-aware aggregator can do better by picking the image's sub-mode.

Every tensor is L2-normalised. `make_world(spec, seed)` is a pure function of its arguments.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch.nn import functional as F

from aape.labels import to_local
from aape.method.descriptions import DescriptionBank
from aape.method.objectives import TrainingSet

SYNTHETIC_NOTICE = "SYNTHETIC EMBEDDINGS (a CLIP-like proxy world, no real CLIP): figures test the method's behaviour, not CLIP's accuracy"


class DescriptionKind(enum.IntEnum):
    """What a description is about; mode-specific descriptions also carry their mode index."""

    MODE = 0
    GENERIC = 1
    IRRELEVANT = 2
    WRONG = 3


@dataclass(frozen=True)
class WorldSpec:
    """Everything that defines a world; the presets below are instances of it."""

    name: str
    summary: str = ""
    base_classes: int = 50
    new_classes: int = 50
    dim: int = 512
    rank: int = 32  # dimension of the subspace the class concepts share (related classes)
    shared: float = 0.95  # share of a concept's energy in that subspace
    structured_noise: float = 0.7  # share of every noise's energy in that subspace
    misalignment: float = 0.3  # how far the text side's class subspace is rotated from the image side's
    modes: int = 3  # visual sub-modes per class
    mode_shift: float = 0.4  # strength of the rotation each sub-mode applies to every class (0 = none, 1 = full)
    mode_style: float = 0.7  # weight of each sub-mode's class-independent trace
    mode_spread: float = 0.25  # class-specific distance of a sub-mode from its class concept (noise units)
    image_noise: float = 1.05  # per-image content noise around its sub-mode
    view_noise: float = 0.35  # augmentation: per-view noise around the clean image
    template_noise_base: float = 0.35  # "a photo of a {}." around the concept, base classes
    template_noise_new: float = 0.2  # ... new classes
    description_noise: float = 0.9
    description_bias: float = 0.25  # one offset shared by all descriptions of a class
    mode_descriptions: int = 4  # per sub-mode
    generic_descriptions: int = 6
    irrelevant_descriptions: int = 8
    wrong_descriptions: int = 3
    irrelevant_noise: float = 0.8  # boilerplate: around one direction shared by every class
    gap: float = 0.6  # weight of the modality's mean direction in every embedding
    modality_cos: float = 0.25  # cos(μ_image, μ_text)
    logit_scale: float = 100.0
    shots: int = 16
    val_shots: int = 4
    views: int = 4
    test_per_class: int = 50
    epoch_rule: str = "synthetic"  # the dataset name CoOp's epoch rule sees ("imagenet": 50 epochs)

    @property
    def num_classes(self) -> int:
        return self.base_classes + self.new_classes

    @property
    def descriptions_per_class(self) -> int:
        return self.modes * self.mode_descriptions + self.generic_descriptions + self.irrelevant_descriptions + self.wrong_descriptions

    def with_(self, **changes) -> "WorldSpec":
        return replace(self, **changes)


PRESETS: dict[str, WorldSpec] = {
    spec.name: spec
    for spec in (
        WorldSpec(
            "clip-like",
            "calibrated to the 11-dataset averages: zero-shot ~69/74 base/new, CuPL a little above, a 16-shot probe far above on base",
        ),
        WorldSpec(
            "hard-domain",
            "a domain CLIP knows poorly (EuroSAT-like): 10 classes, weak and misaligned class-name prompts, informative descriptions",
            base_classes=5,
            new_classes=5,
            image_noise=1.6,
            misalignment=0.75,
            template_noise_base=1.0,
            template_noise_new=1.0,
            description_noise=0.7,
            description_bias=0.15,
            irrelevant_descriptions=4,
            wrong_descriptions=1,
            test_per_class=200,
        ),
        WorldSpec(
            "noisy-descriptions",
            "most descriptions useless, as from a 135M local LLM: boilerplate and wrong classes dominate",
            mode_descriptions=1,
            generic_descriptions=2,
            irrelevant_descriptions=20,
            wrong_descriptions=8,
            description_noise=1.3,
        ),
        WorldSpec(
            "many-classes",
            "ImageNet-scale label space: 500 base + 500 new classes",
            base_classes=500,
            new_classes=500,
            test_per_class=10,
            epoch_rule="imagenet",
        ),
    )
}


def preset(name: str) -> WorldSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown proxy world preset '{name}'; choose one of {', '.join(PRESETS)}") from None


@dataclass
class ImageSet:
    features: torch.Tensor  # [N, d] (or [N, V, d] for training views)
    labels: torch.Tensor  # [N] global
    modes: torch.Tensor  # [N] sub-mode shown


@dataclass
class WorldTruth:
    """The noise-free structure behind a world, for probes that ask what an oracle could reach."""

    concepts: torch.Tensor  # [C, d] class concepts (content, before any modality)
    views: torch.Tensor  # [C, K, d] each concept in each sub-mode: the shared rotation and trace only
    traces: torch.Tensor  # [K, d] each sub-mode's class-independent trace (included in views)
    modes: torch.Tensor  # [C, K, d] the sub-mode centres images are drawn around (views + class-specific spread)
    text_embedding: Callable[[torch.Tensor], torch.Tensor]  # content -> the text side's embedding


@dataclass
class ProxyWorld:
    spec: WorldSpec
    seed: int
    class_text: torch.Tensor  # [C, d] "a photo of a {}." of every class
    descriptions: torch.Tensor  # [M, d]
    description_class: torch.Tensor  # [M] global label
    description_kind: torch.Tensor  # [M] DescriptionKind
    description_mode: torch.Tensor  # [M] sub-mode for MODE descriptions, -1 otherwise
    train: ImageSet  # features [N, V, d]: augmented views of the base classes' shots
    train_clean: torch.Tensor  # [N, d]
    val: ImageSet  # base classes
    test_base: ImageSet
    test_new: ImageSet
    base: list[int] = field(default_factory=list)
    new: list[int] = field(default_factory=list)
    truth: WorldTruth | None = field(default=None, repr=False)

    def training_set(self) -> TrainingSet:
        """The base classes' shots and validation images with local labels, as the stages see them."""
        return TrainingSet(
            self.train.features,
            to_local(self.train.labels, self.base),
            self.val.features,
            to_local(self.val.labels, self.base),
        )

    def bank(self, classes: list[int] | None = None) -> DescriptionBank:
        return DescriptionBank.from_flat(self.descriptions, self.description_class, classes or self.base)

    def relevance(self, classes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per class of `bank(classes)`: kinds [C, n] and modes [C, n] in the bank's order (-1 = padding)."""
        classes = classes or self.base
        kinds, modes = [], []
        for c in classes:
            rows = torch.nonzero(self.description_class == c).flatten()
            kinds.append(self.description_kind[rows])
            modes.append(self.description_mode[rows])
        pad = lambda ts: torch.nn.utils.rnn.pad_sequence(ts, batch_first=True, padding_value=-1)  # noqa: E731
        return pad(kinds), pad(modes)


class _Noise:
    """Gaussian noise of norm ≈ 1, a `structured` share of its energy in the class subspace."""

    def __init__(self, gen: torch.Generator, basis: torch.Tensor, structured: float) -> None:
        self.gen, self.basis, self.structured = gen, basis, structured

    def __call__(self, *shape: int) -> torch.Tensor:
        d, r = self.basis.shape
        flat = torch.randn(*shape[:-1], d, generator=self.gen) / d**0.5
        inside = (torch.randn(*shape[:-1], r, generator=self.gen) / r**0.5) @ self.basis.T
        return self.structured**0.5 * inside + (1 - self.structured) ** 0.5 * flat

    def around(self, center: torch.Tensor, spread: float, *extra: int) -> torch.Tensor:
        """Unit vectors around `center` [..., d]: `extra` leading copies per center."""
        shape = (*extra, *center.shape) if extra else center.shape
        return F.normalize(center + spread * self(*shape), dim=-1)


def make_world(spec: WorldSpec, seed: int) -> ProxyWorld:
    gen = torch.Generator().manual_seed(seed)
    d, C = spec.dim, spec.num_classes
    # modality means: two unit vectors with the stated cosine
    mu_image = F.normalize(torch.randn(d, generator=gen), dim=0)
    other = F.normalize(torch.randn(d, generator=gen), dim=0)
    other = F.normalize(other - (other @ mu_image) * mu_image, dim=0)
    mu_text = spec.modality_cos * mu_image + (1 - spec.modality_cos**2) ** 0.5 * other
    content_weight = (1 - spec.gap**2) ** 0.5

    def image_embedding(content: torch.Tensor) -> torch.Tensor:
        return F.normalize(spec.gap * mu_image + content_weight * F.normalize(content, dim=-1), dim=-1)

    # class concepts with a shared low-rank part, and their sub-modes
    basis = torch.linalg.qr(torch.randn(d, spec.rank, generator=gen))[0]  # [d, r] orthonormal
    rotation = torch.linalg.qr(torch.randn(spec.rank, spec.rank, generator=gen))[0]

    def text_embedding(content: torch.Tensor) -> torch.Tensor:
        content = F.normalize(content, dim=-1)
        inside = content @ basis  # [.., r]
        content = content + spec.misalignment * (inside @ rotation.T - inside) @ basis.T
        return F.normalize(spec.gap * mu_text + content_weight * F.normalize(content, dim=-1), dim=-1)

    noise = _Noise(gen, basis, spec.structured_noise)
    structured = F.normalize(torch.randn(C, spec.rank, generator=gen), dim=-1) @ basis.T
    own = F.normalize(torch.randn(C, d, generator=gen), dim=-1)
    concepts = F.normalize(spec.shared**0.5 * structured + (1 - spec.shared) ** 0.5 * own, dim=-1)
    rotated = _viewed(concepts, basis, spec.mode_shift, spec.modes, gen)
    traces = spec.mode_style * _styles(basis, spec.modes, gen)  # [K, d]
    viewed = rotated + traces
    modes = noise.around(viewed, spec.mode_spread)  # [C, K, d]

    spread = torch.full((C, 1), spec.template_noise_base)
    spread[spec.base_classes :] = spec.template_noise_new
    class_text = text_embedding(concepts + spread * noise(C, d))

    descriptions, kinds, desc_modes, owners = _descriptions(spec, gen, noise, concepts, modes, text_embedding)

    def images(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shown = torch.randint(spec.modes, (len(classes),), generator=gen)
        content = noise.around(modes[classes, shown], spec.image_noise)
        return content, shown

    base = list(range(spec.base_classes))
    new = list(range(spec.base_classes, C))
    train_labels = torch.arange(spec.base_classes).repeat_interleave(spec.shots)
    train_content, train_modes = images(train_labels)
    views = image_embedding(noise.around(train_content, spec.view_noise, spec.views).transpose(0, 1))  # [N, V, d]
    val_labels = torch.arange(spec.base_classes).repeat_interleave(spec.val_shots)
    val_content, val_modes = images(val_labels)
    test_sets = []
    for classes in (base, new):
        labels = torch.tensor(classes).repeat_interleave(spec.test_per_class)
        content, shown = images(labels)
        test_sets.append(ImageSet(image_embedding(content), labels, shown))
    return ProxyWorld(
        spec=spec,
        seed=seed,
        class_text=class_text,
        descriptions=descriptions,
        description_class=owners,
        description_kind=kinds,
        description_mode=desc_modes,
        train=ImageSet(views, train_labels, train_modes),
        train_clean=image_embedding(train_content),
        val=ImageSet(image_embedding(val_content), val_labels, val_modes),
        test_base=test_sets[0],
        test_new=test_sets[1],
        base=base,
        new=new,
        truth=WorldTruth(concepts, viewed, traces, modes, text_embedding),
    )


def _viewed(concepts: torch.Tensor, basis: torch.Tensor, shift: float, modes: int, gen: torch.Generator) -> torch.Tensor:
    """[C, K, d]: each class concept as seen in each sub-mode, a rotation of the class subspace per mode."""
    r = basis.shape[1]
    inside = concepts @ basis  # [C, r]
    views = []
    for _ in range(modes):
        rotation = torch.linalg.qr(torch.randn(r, r, generator=gen))[0]
        views.append(concepts + shift * (inside @ rotation.T - inside) @ basis.T)
    return torch.stack(views, dim=1)


def _styles(basis: torch.Tensor, modes: int, gen: torch.Generator) -> torch.Tensor:
    """[K, d] unit directions outside the class subspace, one per sub-mode."""
    raw = torch.randn(modes, basis.shape[0], generator=gen)
    return F.normalize(raw - (raw @ basis) @ basis.T, dim=-1)


def _descriptions(spec: WorldSpec, gen: torch.Generator, noise: _Noise, concepts: torch.Tensor, modes: torch.Tensor, text_embedding):
    """Flat description embeddings of every class with their kind, mode and owner, shuffled per class."""
    C, d = concepts.shape
    boilerplate = F.normalize(torch.randn(d, generator=gen), dim=0)
    similarity = concepts @ concepts.T
    similarity.fill_diagonal_(-2.0)
    confused_with = similarity.argmax(dim=1)  # the class an LLM would mix this one up with
    bias = spec.description_bias * noise(C, d)  # what the LLM gets wrong about each class
    concepts, modes = concepts + bias, modes + bias.unsqueeze(1)
    parts, kinds, mode_ids = [], [], []
    for k in range(spec.modes):
        parts.append(noise.around(modes[:, k], spec.description_noise, spec.mode_descriptions).transpose(0, 1))
        kinds.append(torch.full((C, spec.mode_descriptions), int(DescriptionKind.MODE)))
        mode_ids.append(torch.full((C, spec.mode_descriptions), k))
    for count, kind, center, spread in (
        (spec.generic_descriptions, DescriptionKind.GENERIC, concepts, spec.description_noise),
        (spec.irrelevant_descriptions, DescriptionKind.IRRELEVANT, boilerplate.expand(C, d), spec.irrelevant_noise),
        (spec.wrong_descriptions, DescriptionKind.WRONG, concepts[confused_with], spec.description_noise),
    ):
        if count:
            parts.append(noise.around(center, spread, count).transpose(0, 1))
            kinds.append(torch.full((C, count), int(kind)))
            mode_ids.append(torch.full((C, count), -1))
    content = torch.cat(parts, dim=1)  # [C, n, d]
    kind = torch.cat(kinds, dim=1)
    mode = torch.cat(mode_ids, dim=1)
    order = torch.stack([torch.randperm(content.shape[1], generator=gen) for _ in range(C)])
    content = torch.gather(content, 1, order.unsqueeze(-1).expand(-1, -1, d))
    kind, mode = torch.gather(kind, 1, order), torch.gather(mode, 1, order)
    owners = torch.arange(C).unsqueeze(1).expand_as(kind)
    return text_embedding(content).reshape(-1, d), kind.reshape(-1), mode.reshape(-1), owners.reshape(-1)
