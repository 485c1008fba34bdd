"""How much could an image-conditioned classifier gain, and is the gain's key already in the image?
(docs/method.md, "Why distillation does not pay on the small presets")

    .venv/bin/python benchmarks/probe_view_oracle.py [--presets clip-like,hard-domain] [--seeds 1,2]

On a SYNTHETIC proxy world (aape/synthetic/world.py), no training of AAPE: classify the test images
by the nearest text embedding among
- `zeroshot`: "a photo of a {class}." (the world's noisy class-name prompt);
- `clean`: the class concept's text embedding without the prompt's noise;
- `trace`: the clean concept plus the image's sub-mode trace (what a head that shifts every class
  by one image-dependent vector could do);
- `view`: the concept as seen in the image's sub-mode (the rotation every class undergoes in that
  sub-mode, and its trace): what a classifier that knows the sub-mode and applies it to any class,
  new ones included, could reach; this part transfers from base to new classes;
- `own`: the class's own sub-mode centre (also its class-specific part, which does not transfer).
Then `sub-mode from x`: a linear probe of the sub-mode from the image embedding, fitted on the base
classes' training images, on held-out base and new images. When `view` is far above `zeroshot`
and the sub-mode is readable from x, the image-conditioned gain is available to any head given x,
and p^a, whose transferable content is that sub-mode, adds no information h lacks without it.
It prints figures, no verdict.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aape.synthetic.world import SYNTHETIC_NOTICE, ImageSet, ProxyWorld, make_world, preset  # noqa: E402


def nearest_text_accuracy(images: ImageSet, classes: list[int], texts: torch.Tensor) -> float:
    """Top-1 among `classes`; `texts` [C, d] for every image alike or [N, C, d] per image."""
    scores = images.features @ texts.T if texts.dim() == 2 else torch.einsum("nd,ncd->nc", images.features, texts)
    predicted = torch.tensor(classes)[scores.argmax(1)]
    return float((predicted == images.labels).float().mean() * 100)


def oracle_rows(world: ProxyWorld, images: ImageSet, classes: list[int]) -> dict[str, float]:
    truth, cls, shown = world.truth, torch.tensor(classes), images.modes
    per_image = lambda centres: truth.text_embedding(centres[cls][:, shown].transpose(0, 1))  # noqa: E731  [N, C, d]
    return {
        "zeroshot": nearest_text_accuracy(images, classes, world.class_text[cls]),
        "clean": nearest_text_accuracy(images, classes, truth.text_embedding(truth.concepts[cls])),
        "trace": nearest_text_accuracy(images, classes, truth.text_embedding(truth.concepts[cls].unsqueeze(0) + truth.traces[shown].unsqueeze(1))),
        "view": nearest_text_accuracy(images, classes, per_image(truth.views)),
        "own": nearest_text_accuracy(images, classes, per_image(truth.modes)),
    }


def submode_probe(world: ProxyWorld) -> tuple[float, float]:
    """Linear read-out of the sub-mode from x: softmax regression on the training images (clean views)."""
    x, y, k = world.train_clean, world.train.modes, world.spec.modes
    probe = torch.nn.Linear(x.shape[1], k)
    optimiser = torch.optim.LBFGS(probe.parameters(), max_iter=300)

    def closure():
        optimiser.zero_grad()
        loss = F.cross_entropy(probe(x * 10), y) + 1e-3 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        return tuple(float((probe(s.features * 10).argmax(1) == s.modes).float().mean() * 100) for s in (world.test_base, world.test_new))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="clip-like,hard-domain")
    parser.add_argument("--seeds", default="1,2")
    args = parser.parse_args()
    print(f"*** {SYNTHETIC_NOTICE} ***")
    for name in args.presets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            world = make_world(preset(name), seed)
            cells = []
            for split, images, classes in (("base", world.test_base, world.base), ("new", world.test_new, world.new)):
                cells.append(split + " " + " ".join(f"{k} {v:.1f}" for k, v in oracle_rows(world, images, classes).items()))
            base, new = submode_probe(world)
            print(f"{name} seed {seed}: " + " | ".join(cells) + f" | sub-mode from x: base {base:.1f} new {new:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
