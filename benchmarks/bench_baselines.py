"""Training cost of the prompt learners and adapters on cached features, beside AAPE's generator.

    .venv/bin/python benchmarks/bench_baselines.py [--classes 5,500] [--model ViT-B-16] [--steps 3]

Every learner trains as the train-baselines stage trains it (the same modules, its published batch
size), on cached CLIP-sized features (d = 512) of 16 shots per class, with the ViT-B-16 text tower
for the CoOp family. The weights are random (no pretrained CLIP can be had here): a text-encoder
pass costs the same with any weights. Per learner and base-class count: seconds per training step
(measured over `--steps` steps after one warm-up step), steps per epoch, seconds per epoch (a full
epoch is run when it takes under a minute, else extrapolated from the steps: marked "est."), and
milliseconds per training image, the unit of KgCoOp's README (GPU: CoOp 6, CoCoOp 160, KgCoOp 6
ms/image; the AAPE paper: CoOp 10.1, CoCoOp 39.5, AAPE 41.9 min of training on a V100 for its
setting).

Checked, PASS/FAIL: CoCoOp's memory guard (aape.methods.cocoop) estimates the activation memory of
a step from Korthikanti et al. 2022; the estimate must lie within 0.5-2x of the memory a step really
keeps for backward (the distinct non-weight tensors autograd saves, counted by a saved-tensors hook), or the guard would either
refuse batches that fit or let through batches that do not.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from aape.backbone import RANDOM_INIT_NOTICE, load_backbone  # noqa: E402
from aape.config import BackboneConfig, GeneratorConfig, Params  # noqa: E402
from aape.method.schedule import make_optimizer  # noqa: E402

SHOTS, VIEWS, DIM = 16, 2, 512
PUBLISHED_MS_PER_IMAGE = {"coop": 6, "cocoop": 160, "kgcoop": 6}  # KgCoOp's README, GPU
FULL_EPOCH_LIMIT_S = 60.0


def classnames(n: int) -> list[str]:
    words = ["red", "tall", "small", "striped", "round", "wooden", "silver", "spotted", "old", "wild"]
    nouns = ["car", "bird", "flower", "house", "field", "dog", "boat", "plane", "tree", "road"]
    return [f"{words[i % 10]} {nouns[(i // 10) % 10]} {i // 100}" if i >= 100 else f"{words[i % 10]} {nouns[i // 10]}" for i in range(n)]


def learners(backbone, names: list[str], defaults: Params):
    """(method, model, batch size) as the stage builds them, on the training classes `names`."""
    from aape.methods.clip_adapter import AdapterOverClasses, ImageAdapter
    from aape.methods.cocoop import ConditionalPrompts, MetaNet
    from aape.methods.coop import ContextPrompts
    from aape.methods.prompt_encoder import PromptEncoder
    from aape.methods.tip_adapter import CacheModel

    C, b = len(names), defaults.baselines
    text = F.normalize(torch.randn(C, DIM), dim=-1)
    encoder = PromptEncoder(backbone, names, b.coop.n_ctx)
    start = encoder.init_context(b.coop.ctx_init)
    keys = F.normalize(torch.randn(C * SHOTS, DIM), dim=-1)
    values = F.one_hot(torch.arange(C).repeat_interleave(SHOTS), C).float()
    return [
        ("coop", lambda: ContextPrompts(encoder, start, 100.0), b.coop.schedule),
        ("kgcoop", lambda: ContextPrompts(encoder, start, 100.0, text, b.kgcoop.kg_weight), b.kgcoop.schedule),
        ("cocoop", lambda: ConditionalPrompts(encoder, start, MetaNet(DIM, encoder.width, b.cocoop.meta_reduction), 100.0), b.cocoop.schedule),
        ("clip-adapter", lambda: AdapterOverClasses(ImageAdapter(DIM, b.clip_adapter.reduction, b.clip_adapter.ratio), text, 100.0),
         b.clip_adapter.schedule),
        ("tip-adapter-f", lambda: CacheModel(keys, values, text, 100.0, 1.17, 1.0), b.tip_adapter_f.schedule),
        ("aape (h + g)", lambda: _AAPE(text), defaults.generator.schedule),
    ]


class _AAPE(torch.nn.Module):
    """AAPE's generator step on the same data: the fast head over the training classes plus the distillation term."""

    def __init__(self, text: torch.Tensor) -> None:
        super().__init__()
        from aape.method.model import AAPEModel

        self.model = AAPEModel.from_config(GeneratorConfig(), DIM, 100.0)
        self.register_buffer("text", text)
        self.target = F.normalize(torch.randn(DIM), dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._prompt = self.model.prompt_embedding(x)
        return self.model.logits(x, self.text)

    def regulariser(self) -> torch.Tensor:
        return 5.0 * ((self._prompt - self.target) ** 2).sum(-1).mean()


def time_steps(model, schedule, C: int, steps: int) -> tuple[float, int, float, bool]:
    """(seconds per step, steps per epoch, seconds per epoch, measured over a full epoch)."""
    n = C * SHOTS
    batch = min(schedule.batch_size, n)
    per_epoch = max(1, n // batch)
    optimizer = make_optimizer(model.parameters(), schedule)
    x_all = F.normalize(torch.randn(n, DIM), dim=-1)
    y_all = torch.arange(C).repeat_interleave(SHOTS)

    def step(i: int) -> None:
        rows = torch.randint(n, (batch,))
        logits = model(x_all[rows])
        loss = F.cross_entropy(logits, y_all[rows])
        if hasattr(model, "regulariser"):
            loss = loss + model.regulariser()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(0)  # warm-up
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    per_step = (time.perf_counter() - started) / steps
    if per_step * per_epoch <= FULL_EPOCH_LIMIT_S and per_epoch > steps:
        started = time.perf_counter()
        for i in range(per_epoch):
            step(i)
        return per_step, per_epoch, time.perf_counter() - started, True
    return per_step, per_epoch, per_step * per_epoch, per_epoch <= steps


def memory_probe(backbone, classes: int, batch: int) -> dict:
    """CoCoOp's estimate beside the activations one training step really keeps for backward: the bytes
    of every distinct tensor autograd saves (torch.autograd.graph.saved_tensors_hooks), on any device."""
    from aape.methods.cocoop import ConditionalPrompts, MetaNet
    from aape.methods.prompt_encoder import PromptEncoder

    encoder = PromptEncoder(backbone, classnames(classes), 4)
    model = ConditionalPrompts(encoder, encoder.init_context("a photo of a"), MetaNet(DIM, encoder.width, 16), 100.0).to(backbone.device)
    x = F.normalize(torch.randn(batch, DIM), dim=-1).to(backbone.device)
    seen: dict[tuple[int, int], int] = {}
    # weights saved for the input gradient are resident anyway: not activations
    resident = {t.untyped_storage().data_ptr() for t in (*backbone.model.parameters(), *backbone.model.buffers(), *model.parameters())}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident:
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long, device=backbone.device))
    loss.backward()
    return {"estimate": encoder.activation_bytes(batch * classes), "measured": sum(seen.values()), "tokens": encoder.length}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", default="5,500")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(BackboneConfig(model=args.model, pretrained="random-init"), device=device)
    print(f"{RANDOM_INIT_NOTICE} ({args.model}; a text-encoder pass costs the same with any weights)")
    print(f"device {device}, {torch.get_num_threads()} threads; {SHOTS} shots per class, features d={DIM}")
    defaults = Params()
    print("| learner | base classes | batch | steps/epoch | s/step | s/epoch | ms/image | published GPU ms/image (KgCoOp README) |")
    print("|---|---|---|---|---|---|---|---|")
    for C in (int(c) for c in args.classes.split(",")):
        for method, make, schedule in learners(backbone, classnames(C), defaults):
            model = make().to(backbone.device)
            per_step, per_epoch, epoch_s, full = time_steps(model, schedule, C, args.steps)
            ms_image = 1000 * epoch_s / (per_epoch * min(schedule.batch_size, C * SHOTS))
            print(f"| {method} | {C} | {min(schedule.batch_size, C * SHOTS)} | {per_epoch} | {per_step:.4f} | "
                  f"{epoch_s:.1f}{'' if full else ' est.'} | {ms_image:.2f} | {PUBLISHED_MS_PER_IMAGE.get(method, '-')} |", flush=True)
    print("Published totals (AAPE paper, V100, its setting): CoOp 10.1 min, CoCoOp 39.5 min, AAPE 41.9 min of training.")
    ok = True
    for classes, batch in ((5, 4), (50, 2)):
        probe = memory_probe(backbone, classes, batch)
        ratio = probe["estimate"] / max(probe["measured"], 1)
        verdict = 0.5 <= ratio <= 2.0
        ok &= verdict
        print(f"CoCoOp memory estimate, batch {batch} x {classes} classes x {probe['tokens']} tokens: "
              f"{probe['estimate'] / 2**20:.0f} MiB estimated, {probe['measured'] / 2**20:.0f} MiB measured, ratio {ratio:.2f} "
              f"(target 0.5-2): {'PASS' if verdict else 'FAIL'}")
    print("OVERALL:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
