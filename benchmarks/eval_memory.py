"""What BLIP retrieval evaluation holds on each GPU for COCO's 5k test split, before and after the image
sequences were re-encoded chunk by chunk in the compute dtype: computed from the shapes (no GPU needed;
``gpu_check.py`` measures the peak on a lent one).

    python benchmarks/eval_memory.py [--images 5000] [--texts 25010] [--image-size 384] [--vision-hidden 768]

Before: every image of the rank's share kept as its full ViT sequence, in fp32 (evaluation ran without
autocast). After: one chunk of ``eval_batch_size`` images at a time, in bf16/fp16. The ITC similarity matrix
(images × texts, fp32, whole on every rank) and the features do not change: they still grow with the split.
"""

from __future__ import annotations

import argparse
import inspect

from rich.console import Console
from rich.table import Table

from upop.tasks.base import Task

MIB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--texts", type=int, default=25010)
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--vision-hidden", type=int, default=768)
    ap.add_argument("--embed", type=int, default=256, help="ITC feature width")
    args = ap.parse_args()
    chunk = inspect.signature(Task.__init__).parameters["eval_batch_size"].default
    tokens = (args.image_size // args.patch) ** 2 + 1
    seq_bytes = tokens * args.vision_hidden  # per image, per byte of dtype
    table = Table(title=f"BLIP retrieval evaluation memory per GPU: {args.images} images, {args.texts} texts, "
                        f"{tokens} image tokens × {args.vision_hidden}")
    for col in ("GPUs", "image sequences before (fp32, rank's share)", "after (one chunk of "
                f"{chunk}, bf16)", "ITC similarity (fp32, every rank)", "features (fp32)"):
        table.add_column(col, justify="right")
    sim = args.images * args.texts * 4 / MIB
    feats = (args.images + args.texts) * args.embed * 4 / MIB
    for world in (1, 8):
        before = -(-args.images // world) * seq_bytes * 4 / MIB
        after = min(chunk, -(-args.images // world)) * seq_bytes * 2 / MIB
        table.add_row(str(world), f"{before:,.0f} MiB", f"{after:,.1f} MiB", f"{sim:,.0f} MiB", f"{feats:,.1f} MiB")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
