"""Benchmark: the captioning/VQA prefix model with the offline SmolLM2-135M on this machine's CPU.

Prints, measured side by side in one run:
- training steps per second of the prefix maps (the LM frozen; batch of easy-VQA captions), without
  and with the AAPE token and with h finetuned, and what AAPE costs per step; the same for LiMBeR's
  grid prefix (`prefix.image_features: grid`: RN50x16's 144 vectors of 3072, one LM token each);
- captions per second of greedy decoding with the KV cache, beside recomputing the whole sequence for
  every token (what the cache saves), and of nucleus sampling; greedy with the grid prefix.
CLIP image embeddings (and grids) are random here: the LM's cost does not depend on their values.

No target is set by the issue; the figures are for users planning a run.

    .venv/bin/python benchmarks/bench_vl.py [--batch 16] [--steps 6] [--images 32] [--tokens 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from aape.data.captions import easy_vqa_captions  # noqa: E402
from aape.vl.prefix import Decoding, PrefixMaps, caption_row, generate, lm_loss, load_language_model, pack  # noqa: E402

CLIP_DIM = 512
GRID = (144, 3072)  # RN50x16 at 384 px, LiMBeR's image prefix


def _maps(lm, aape_tokens: int, train_h: bool = False, grid: bool = False) -> PrefixMaps:
    tokens, channels = GRID if grid else (4, None)
    return PrefixMaps(CLIP_DIM, lm.width, tokens=tokens, aape_tokens=aape_tokens, train_h=train_h, grid_channels=channels)


def _inputs(n: int, grid: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    return F.normalize(torch.randn(n, CLIP_DIM), dim=-1), torch.randn(n, *GRID) if grid else None


def training_rate(lm, captions: list[str], batch: int, steps: int, aape_tokens: int, train_h: bool, grid: bool = False) -> float:
    torch.manual_seed(0)
    maps = _maps(lm, aape_tokens, train_h, grid)
    optimiser = torch.optim.AdamW([p for p in maps.parameters() if p.requires_grad], lr=8e-4)
    x, grids = _inputs(batch, grid)

    def step(i: int) -> None:
        chunk = [captions[(i * batch + j) % len(captions)] for j in range(batch)]
        optimiser.zero_grad()
        lm_loss(lm, pack(lm, [caption_row(lm, p, c) for p, c in zip(maps(x, grid=grids), chunk)], left_pad=False)).backward()
        optimiser.step()

    step(0)  # warm-up
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    return steps / (time.perf_counter() - start)


@torch.no_grad()
def uncached_greedy(lm, rows, max_new_tokens: int) -> None:
    """Greedy decoding as `generate` does it (same stop rule, so the same tokens), without the KV cache."""
    batch = pack(lm, rows, left_pad=True)
    embeds, mask = batch["inputs_embeds"], batch["attention_mask"]
    done = torch.zeros(len(rows), dtype=torch.bool)
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        token = lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1)
        done |= token == lm.eos_id
        if bool(done.all()):
            break
        embeds = torch.cat([embeds, lm.embed(token.unsqueeze(1))], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)


def decoding_rate(lm, images: int, batch: int, tokens: int, how: str, grid: bool = False) -> float:
    torch.manual_seed(0)
    maps = _maps(lm, 1, grid=grid).eval()
    x, grids = _inputs(images, grid)
    with torch.no_grad():
        prefixes = maps(x, grid=grids)
    decoding = Decoding("sample" if how == "sample" else "greedy", max_new_tokens=tokens)
    start = time.perf_counter()
    for i in range(0, images, batch):
        rows = [caption_row(lm, p) for p in prefixes[i:i + batch]]
        if how == "uncached":
            uncached_greedy(lm, rows, tokens)
        else:
            generate(lm, rows, decoding, seed=i)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lm = load_language_model(args.lm)
    print(f"language model {lm.name} (width {lm.width}) loaded in {time.perf_counter() - start:.1f} s; "
          f"{args.threads} torch threads; CLIP side: random unit vectors of width {CLIP_DIM}")
    captions = [c for record in easy_vqa_captions("train")[:200] for c in record.captions]
    rates = {
        "prefix only": training_rate(lm, captions, args.batch, args.steps, 0, False),
        "+ AAPE token (h frozen)": training_rate(lm, captions, args.batch, args.steps, 1, False),
        "+ AAPE token (h finetuned)": training_rate(lm, captions, args.batch, args.steps, 1, True),
        "grid prefix, 144 tokens (LiMBeR)": training_rate(lm, captions, args.batch, args.steps, 0, False, grid=True),
        "grid prefix + AAPE token (h finetuned)": training_rate(lm, captions, args.batch, args.steps, 1, True, grid=True),
    }
    print(f"\ntraining, batch {args.batch} captions, {args.steps} timed steps")
    print("| model | steps/s | captions/s | time vs prefix only |\n|---|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.2f} | {rate * args.batch:.1f} | {rates['prefix only'] / rate:.2f}x |")
    decoding = {how: decoding_rate(lm, args.images, args.batch, args.tokens, how) for how in ("cached", "uncached", "sample")}
    decoding["grid"] = decoding_rate(lm, args.images, args.batch, args.tokens, "cached", grid=True)
    print(f"\ndecoding {args.images} captions of {args.tokens} tokens, batch {args.batch}")
    print("| decoding | captions/s |\n|---|---|")
    print(f"| greedy, KV cache | {decoding['cached']:.2f} |\n| greedy, whole sequence recomputed per token | {decoding['uncached']:.2f} |")
    print(f"| nucleus sampling (T 0.7, top-p 0.9), KV cache | {decoding['sample']:.2f} |")
    print(f"| greedy, KV cache, grid prefix (144 + 1 AAPE tokens) | {decoding['grid']:.2f} |")
    print(f"\nKV cache speed-up: {decoding['cached'] / decoding['uncached']:.2f}x; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
