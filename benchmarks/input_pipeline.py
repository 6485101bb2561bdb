"""Input pipeline throughput: images/s and CPU ms per image, today's synchronous path against the
DataLoader pipeline with 0, 1 and 2 workers, at 384 px (BLIP) and 224 px (CLIP), on synthetic 640×480
JPEGs; the share of a step spent waiting for data with a stand-in model whose step time is fixed; and
the CPU cores one GPU would need.

- "synchronous": what upop did before the pipeline — each batch built in the training loop by the
  model's processor (decode, PIL resize, float rescale and normalise on the host, in float32).
- "pipeline": ``upop.tasks.base.Batches`` over an ``ImageStore``: workers decode and resize to uint8;
  normalising is left to the device (not timed here: on a GPU it is one table look-up per pixel).
CPU time counts this process and its workers (reaped workers' rusage), so it is the whole cost.

Cores per GPU = images/s the GPU trains × CPU seconds per image. The rates are FLOP-derived (issue 12):
BLIP-base ITR costs 516.6 GFLOP per training image, CLIP ViT-B/16 107 GFLOP; one H100 sustaining
150 TFLOP/s trains ~290 and ~1400 images/s.

    python benchmarks/input_pipeline.py [--images 256 --batch 32 --step-ms auto]

Numbers on a shared machine are noisy; nothing here gates CI.
"""

from __future__ import annotations

import argparse
import gc
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import transformers
from PIL import Image
from rich.console import Console
from rich.table import Table

from upop.datasets.readers import open_image
from upop.tasks.base import Batches, ImageStore, Images, Preprocessor

GPU_RATE = {"BLIP-base ITR": (384, 290.0), "CLIP ViT-B/16": (224, 1400.0)}


def processor(px: int):
    if px == 224:  # CLIP: shortest edge, centre crop
        return transformers.CLIPImageProcessorPil(size={"shortest_edge": px}, crop_size={"height": px, "width": px})
    return transformers.BlipImageProcessorPil(size={"height": px, "width": px})


def write_jpegs(folder: Path, n: int) -> list[Path]:
    """Photo-like 640×480 JPEGs (smooth random fields: JPEG decodes them at a photo's cost)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        field = np.cumsum(rng.integers(-4, 5, (480, 640, 3)), axis=1) + rng.integers(0, 256, (1, 1, 3))
        paths.append(folder / f"{i:05d}.jpg")
        Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    return paths


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def synchronous(paths: list[Path], px: int, batch: int) -> tuple[float, float]:
    prep = Preprocessor(None, processor(px))
    t0, c0 = time.perf_counter(), cpu_seconds()
    for s in range(0, len(paths), batch):
        prep.pixels([open_image(p) for p in paths[s : s + batch]])
    return time.perf_counter() - t0, cpu_seconds() - c0


def pipeline_batches(paths: list[Path], px: int, batch: int, workers: int) -> Batches:
    store = ImageStore(Preprocessor(None, processor(px)), workers=workers, cache_gb=0)
    return Batches(len(paths), batch, lambda idx, rng: {"pixel_values": Images(tuple(paths[i] for i in idx))},
                   seed=0, images=store)


def pipeline(paths: list[Path], px: int, batch: int, workers: int, step_s: float = 0.0) -> tuple[float, float, float]:
    """(wall s, CPU s, share of the steps after the first spent waiting for data) over one pass, workers
    started and stopped inside (the first batch waits for them to start, once per run)."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    waits = []
    batches = pipeline_batches(paths, px, batch, workers)
    it = iter(batches)
    while True:
        w0 = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            break
        waits.append(time.perf_counter() - w0)
        time.sleep(step_s)  # the stand-in model: a fixed step, no CPU
    del it, batches
    gc.collect()  # the workers exit and are reaped: their CPU time is in RUSAGE_CHILDREN
    steady = sum(waits[1:])
    return time.perf_counter() - t0, cpu_seconds() - c0, steady / max(1e-9, steady + step_s * (len(waits) - 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="0 must be among them")
    args = ap.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images)
        n = len(paths)
        rows, cost = [], {}
        for px in (384, 224):
            wall, cpu = synchronous(paths, px, args.batch)
            rows.append((f"{px}", "synchronous (before)", "-", n / wall, 1e3 * cpu / n))
            cost[(px, "sync")] = cpu / n
            for w in args.workers:
                wall, cpu, _ = pipeline(paths, px, args.batch, w)
                rows.append((f"{px}", "pipeline", str(w), n / wall, 1e3 * cpu / n))
                cost[(px, w)] = cpu / n
        table = Table(title=f"input pipeline, {n} synthetic 640×480 JPEGs, batch {args.batch}")
        for c in ("px", "path", "workers", "images/s", "CPU ms / image"):
            table.add_column(c, justify="right")
        for r in rows:
            table.add_row(r[0], r[1], r[2], f"{r[3]:.0f}", f"{r[4]:.2f}")
        console.print(table)

        best = max(args.workers)
        need = Table(title=f"CPU cores one GPU needs (FLOP-derived rate × CPU s / image; pipeline: {best} workers)")
        for c in ("model", "px", "GPU images/s", "cores, synchronous", "cores, pipeline"):
            need.add_column(c, justify="right")
        for name, (px, rate) in GPU_RATE.items():
            need.add_row(name, str(px), f"{rate:.0f}", f"{rate * cost[(px, 'sync')]:.1f}", f"{rate * cost[(px, best)]:.1f}")
        console.print(need)

        wait = Table(title="data-wait share at 384 px after the first batch, stand-in model with a fixed step (sleep)")
        for c in ("step", "step ms", "workers", "waiting for data"):
            wait.add_column(c, justify="right")
        # BLIP-base on an H100 needs more cores than a laptop has; the second step is what one worker here
        # decodes a batch in, so two workers should leave (almost) no wait.
        steps = {"BLIP-base, 290 img/s": args.batch / GPU_RATE["BLIP-base ITR"][1],
                 "one worker's batch": args.batch * cost[(384, 0)]}
        for label, step in steps.items():
            for w in args.workers:
                _wall, _cpu, share = pipeline(paths, 384, args.batch, w, step_s=step)
                wait.add_row(label, f"{1e3 * step:.0f}", str(w), f"{100 * share:.0f} %")
        console.print(wait)


if __name__ == "__main__":
    main()
