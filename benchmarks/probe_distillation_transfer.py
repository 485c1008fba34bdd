"""Does what h learns from p^a on base classes carry to new classes? (docs/method.md, "Why
distillation does not pay here")

    .venv/bin/python benchmarks/probe_distillation_transfer.py [--presets clip-like,hard-domain] [--seeds 1,2]
        [--ridge 0.01,1,30]

On a SYNTHETIC proxy world (aape/synthetic/world.py): train the default aggregator as the pipeline
does, then fit the best linear predictor of p^a from the image (ridge regression on the base classes'
training views; h, a 2-layer MLP trained by distillation, does no better, see its distill_ratio in
bench_generalization). Report, per ridge strength:
- `ratio`: held-out ‖pred − p^a‖² over the best constant predictor's (as bench_generalization);
- accuracy of the nearest class-name embedding to the image (`x`, zero-shot), to the prediction
  (`p`), to the prediction less its mean (`p-mean`) and to image + prediction (`x+p`), on base and
  new classes.
If `p` is far below `x` on new classes while above it on base, p^a's learnable content names base
classes only, and distillation cannot add knowledge of new ones. It prints figures, no verdict.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aape.config import AggregatorConfig  # noqa: E402
from aape.evaluation.classifiers import zeroshot  # noqa: E402
from aape.method.aggregator import aggregator_from_config  # noqa: E402
from aape.labels import to_local  # noqa: E402
from aape.method.objectives import best_constant, compute_summaries, seeded, summarize_images, train_aggregator  # noqa: E402
from aape.synthetic.proxy import accuracy_on  # noqa: E402
from aape.synthetic.world import SYNTHETIC_NOTICE, ImageSet, make_world, preset  # noqa: E402


def ridge(x: torch.Tensor, y: torch.Tensor, strength: float):
    """The least-squares map x -> y with an L2 penalty, as a function of new x."""
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    weights = torch.linalg.solve(xc.T @ xc + strength * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ (y - y_mean))
    return lambda q: (q - x_mean) @ weights + y_mean, y_mean


def probe(name: str, seed: int, strengths: list[float]) -> list[str]:
    spec = preset(name)
    world = make_world(spec, seed)
    data, bank = world.training_set(), world.bank()
    cfg = AggregatorConfig()
    with seeded(seed):
        aggregator = aggregator_from_config(cfg, spec.dim, seed)
    train_aggregator(aggregator, data, bank, cfg.schedule, cfg.schedule.resolved_epochs(spec.shots, spec.epoch_rule), seed, cfg.reward_scale)
    summaries, _ = compute_summaries(aggregator, data.views, world.train_clean, data.labels, bank)
    held = world.test_base
    held_summaries = summarize_images(aggregator, held.features, to_local(held.labels, world.base), bank)
    constant_error = (held_summaries - best_constant(summaries)).pow(2).sum(-1).mean()
    lines = []
    for strength in strengths:
        predict, mean = ridge(data.views.reshape(-1, spec.dim), summaries.reshape(-1, spec.dim), strength)
        ratio = float((predict(held.features) - held_summaries).pow(2).sum(-1).mean() / constant_error)
        cells = []
        for split, images, classes in (("base", world.test_base, world.base), ("new", world.test_new, world.new)):
            pred = predict(images.features)
            queries = {"x": images.features, "p": pred, "p-mean": pred - mean, "x+p": F.normalize(images.features, dim=-1) + F.normalize(pred, dim=-1)}
            for label, query in queries.items():
                acc = accuracy_on(zeroshot(world.class_text, spec.logit_scale), ImageSet(F.normalize(query, dim=-1), images.labels, images.modes), classes)
                cells.append(f"{split} {label} {acc:.1f}")
        lines.append(f"{name} seed {seed} ridge {strength:g}: ratio {ratio:.3f}; " + ", ".join(cells))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="clip-like,hard-domain")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--ridge", default="0.01,1,30")
    args = parser.parse_args()
    print(f"*** {SYNTHETIC_NOTICE} ***")
    strengths = [float(s) for s in args.ridge.split(",")]
    for name in args.presets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for line in probe(name, seed, strengths):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
