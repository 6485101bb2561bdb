"""A BLIP-base-size retrieval model through the whole road: compress (a few search and retrain steps), slim, export.

Random weights from a BLIP-base-size config (vision 768 × 12 layers at 384 px, patch 16; text 768 × 12
layers; init std 0.02 — BLIP's own vision init of 1e-10 makes CPU backward ~20× slower through denormal
numbers) and synthetic 640×480 JPEGs in the Karpathy retrieval format. It measures what a user needs
to size a real run: step times and images/s of the search and the retrain (with the share of time spent
waiting for data), peak host memory (and CUDA memory on a GPU), the evaluation's per-image sequence and the
one chunk of them held at a time, the slim model's size, and the ONNX export's size and time.
The numbers are about cost, not accuracy.

    python benchmarks/real_size.py [--images 64 --batch 4 --steps 2 --workers 2 --device auto]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

import upop
from upop.adapters import get_adapter
from upop.models.demo import build_tokenizer
from upop.tasks import Preprocessor
from upop.training.parts import amp_dtype

CLASS = "BlipForImageTextRetrieval"


def write_data(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` synthetic 640×480 JPEGs (noise plus a few rectangles) with captions, split 3:1:1."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    words = ["red", "blue", "green", "square", "circle", "left", "right", "small", "large", "a", "on", "the"]
    recs: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for i in range(n):
        pix = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, 400), rng.integers(0, 560)
            pix[y:y + 80, x:x + 80] = rng.integers(0, 255, 3)
        Image.fromarray(pix).save(root / "img" / f"{i}.jpg", quality=90)
        caps = [" ".join(rng.choice(words, 8)) for _ in range(2)]
        split = "train" if i % 5 < 3 else ("val" if i % 5 == 3 else "test")
        if split == "train":
            recs[split] += [{"image": f"img/{i}.jpg", "caption": c, "image_id": str(i)} for c in caps]
        else:
            recs[split].append({"image": f"img/{i}.jpg", "caption": caps})
    for split, rows in recs.items():
        (root / f"retrieval_{split}.json").write_text(json.dumps(rows))
    return root


def write_model(root: Path, image_size: int, hidden: int = 768, layers: int = 12, heads: int = 12) -> tuple[Path, int]:
    """A BLIP-base-size model folder (by default) with random weights (std 0.02), the offline tokenizer and a
    processor."""
    adapter = get_adapter("blip")
    tok = build_tokenizer()
    cfg = adapter.small_config(CLASS, hidden=hidden, layers=layers, heads=heads, image_size=image_size, patch_size=16,
                               vocab=30524, token_ids={"bos_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id,
                                                       "pad_token_id": tok.pad_token_id})
    torch.manual_seed(0)
    model = adapter.build(CLASS, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    model.config.architectures = [CLASS]
    model.save_pretrained(root)
    Preprocessor(tok, adapter.image_processor(image_size)).save_pretrained(root)
    return root, sum(p.numel() for p in model.parameters())


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def eval_bytes_per_image(model_dir: Path, device: torch.device, amp: bool = True) -> float:
    """Bytes one test image's sequence takes in evaluation (what ITM re-ranking reads, re-encoded one chunk of
    images at a time), in the compute dtype of the run (fp32 on CPU, bf16/fp16 under CUDA AMP)."""
    adapter = get_adapter("blip")
    model = upop.load(model_dir, device=str(device)).eval()
    size = model.config.vision_config.image_size
    with torch.no_grad():
        seq, _emb = adapter.encode_image(model, torch.randn(1, 3, size, size, device=device))
    itemsize = 2 if amp_dtype(device, amp) is not None else 4
    return seq.numel() * itemsize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="search steps and retrain steps")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--precision", choices=["amp", "fp32", "both"], default="amp",
                    help="training precision on a GPU (AMP: bf16, or fp16 where bf16 is not native); both: one "
                         "compress each, on the same data and model (the export and memory rows are AMP's)")
    args = ap.parse_args()
    console = Console(width=140)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        data = write_data(root / "data", args.images)
        model_dir, params = write_model(root / "model", args.image_size)
        console.log(f"{params / 1e6:.1f} M parameters; data and model written in {time.perf_counter() - t0:.0f} s")
        runs = {}
        for amp in {"amp": [True], "fp32": [False], "both": [True, False]}[args.precision]:
            t0 = time.perf_counter()
            try:  # one precision failing (out of memory, say) leaves the other's rows
                res = upop.compress(str(model_dir), config(args, amp), data=data, batch_size=args.batch,
                                    eval_limit=8, task_options={"workers": args.workers})
            except Exception as exc:  # noqa: BLE001  (said, and the next precision runs)
                console.print(f"{precision(args, amp)}: FAILED: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            runs[amp] = (res, time.perf_counter() - t0)
            console.print(f"{precision(args, amp)}: " + ", ".join(
                f"{phase} {res.report.performance[phase]['images_per_s']:.2f} images/s" for phase in ("search", "retrain")))
        if not runs:
            raise SystemExit("no compress finished")
        amp, (res, _secs) = next(iter(runs.items()))
        slim_dir = res.save(root / "slim")
        from upop.exporters import get

        t0 = time.perf_counter()
        get("onnx")(slim_dir, root / "onnx")
        export_s = time.perf_counter() - t0
        device = run_device(args)
        per_image = eval_bytes_per_image(slim_dir, device, amp)
        report(console, args, runs, params, export_s, per_image, folder_mb(slim_dir), folder_mb(root / "onnx"))


def config(args, amp: bool) -> upop.CompressConfig:
    return upop.CompressConfig(ratio=args.ratio, device=args.device,
                               search=upop.SearchConfig(steps=args.steps, update_every=1, lr=1e-5, amp=amp),
                               retrain=upop.RetrainConfig(epochs=1, steps_per_epoch=args.steps, lr=1e-5, amp=amp))


def run_device(args) -> torch.device:
    return torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")


def precision(args, amp: bool) -> str:
    dtype = amp_dtype(run_device(args), amp)
    if dtype is None:
        return "fp32" if not amp else "AMP asked, fp32 (none on the CPU)"
    return f"AMP {str(dtype).replace('torch.', '')}"


def report(console: Console, args, runs: dict, params: int, export_s: float, per_image: float,
           slim_mb: float, onnx_mb: float) -> None:
    dev = run_device(args)
    table = Table(title=f"BLIP-base-size ITR at {args.image_size} px, batch {args.batch}, {args.workers} workers, "
                        f"ratio {args.ratio}, {args.steps} steps a phase, {torch.get_num_threads()} threads, "
                        f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    first = next(iter(runs.values()))[0].report
    rows = [("parameters before → after", f"{params / 1e6:.1f} M → {first.params['after']['total'] / 1e6:.1f} M")]
    for amp, (res, compress_s) in runs.items():
        perf, tag = res.report.performance, precision(args, amp)
        for phase in ("search", "retrain"):
            p = perf[phase]
            rows.append((f"{tag}: {phase}: s per step / images/s / data wait",
                         f"{p['step_s']:.2f} / {p['images_per_s']:.2f} / {100 * p['data_wait']:.1f} %"))
        rows += [(f"{tag}: seconds: {k}", f"{v:.1f}") for k, v in perf["seconds"].items()]
        rows += [(f"{tag}: peak memory: {k}", f"{v:,.0f} MiB") for k, v in perf["peak_memory"].items()]
        rows.append((f"{tag}: compress wall time (s)", f"{compress_s:.0f}"))
    rows += [("evaluation: MB per test image sequence (the ITM input)", f"{per_image / 2**20:.2f}"),
             ("evaluation: MB held of them at once (one chunk of 64 images, whatever the split)",
              f"{64 * per_image / 2**20:.1f}"),
             ("slim checkpoint (MB)", f"{slim_mb:.0f}"), ("ONNX export: s / MB", f"{export_s:.0f} / {onnx_mb:.0f}")]
    for r in first.latency or []:
        rows.append((f"latency {r['runtime']} batch {r['batch']} before → after (ms)",
                     f"{r['before_ms']:.1f} → {r['after_ms']:.1f} ({r['speedup']:.2f}×)"))
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


if __name__ == "__main__":
    main()
