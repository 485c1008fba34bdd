"""GPU path check (issue 19), for a machine with a CUDA device: one short script, about 2 minutes.

    .venv/bin/python benchmarks/device_check.py [--images 512] [--batch 128] [--workers 8]

What it checks, side by side in one run, with random ViT-B-16 weights (the same FLOPs as trained):
  1. mixed precision: fp16 features (precision auto on CUDA) against fp32 features of the same
     uint8 pixels, cosine >= 0.999 per image;
  2. the encoder on pre-decoded uint8 pixels (pinned, normalised on the GPU) beside the extractor
     end to end on JPEG files (decoding workers, cache write): decoding's share <= 10%;
  3. the AAPE head on cached features at 1000 classes against zero-shot: >= 0.3x.
Exits 1 when a check fails, 2 when there is no CUDA device (nothing is measured then).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from aape.backbone import load_backbone  # noqa: E402
from aape.config import BackboneConfig  # noqa: E402
from aape.features import image_features  # noqa: E402
from aape.method import AAPEModel  # noqa: E402
from bench_features import photo_jpegs  # noqa: E402  (benchmarks/ is the script's folder)


def timed(fn) -> float:
    """Seconds of one call after a warm-up call, with the GPU's queue drained on both sides."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("device_check: no CUDA device visible; nothing measured")
        return 2
    print(f"device_check on {torch.cuda.get_device_name()} (random ViT-B-16 weights)")
    half = load_backbone(BackboneConfig(model="ViT-B-16", pretrained="random-init"), device="cuda")
    full = load_backbone(BackboneConfig(model="ViT-B-16", pretrained="random-init", precision="fp32"), device="cuda")
    results = []

    pixels = (torch.rand(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).pin_memory()
    cosine = F.cosine_similarity(half.encode_images(pixels), full.encode_images(pixels)).min().item()
    results.append((f"fp16 ({half.dtype}) vs fp32 features, lowest cosine", cosine, cosine >= 0.999))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        names = photo_jpegs(root, args.images)  # creates the folder
        batches = [pixels] * (args.images // args.batch)
        encoder = len(batches) * args.batch / timed(lambda: [half.encode_images(b) for b in batches])
        runs = iter(range(10))
        extractor = args.images / timed(lambda: image_features(half, root, names, Path(tmp) / f"cache{next(runs)}", batch_size=args.batch, num_workers=args.workers))
    share = max(0.0, 1 - extractor / encoder)
    print(f"encoder on pre-decoded uint8 {encoder:,.0f} img/s; extractor on JPEGs {extractor:,.0f} img/s ({args.workers} workers)")
    results.append(("decoding's share of extractor throughput", share, share <= 0.10))

    d = half.embed_dim
    model = AAPEModel(d, logit_scale=half.logit_scale).cuda().eval()
    text = F.normalize(torch.randn(args.classes, d, device="cuda"), dim=-1)
    feats = F.normalize(torch.randn(16384, d, device="cuda"), dim=-1)
    part = model.class_part(text)
    with torch.inference_mode():
        zeroshot = timed(lambda: [(feats[i : i + 1024] @ text.T).argmax(-1) for i in range(0, len(feats), 1024)])
        aape = timed(lambda: [model.logits_from(feats[i : i + 1024], part).argmax(-1) for i in range(0, len(feats), 1024)])
    results.append((f"AAPE head vs zero-shot at {args.classes} classes (cached features)", zeroshot / aape, zeroshot / aape >= 0.3))

    for label, value, ok in results:
        print(f"{label}: {value:.4f} -> {'PASS' if ok else 'FAIL'}")
    return 0 if all(ok for _, _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
