"""GPU checks in one go (for a lent H100/H200, a few minutes): prints one table.

1. A search step with AMP on CUDA (bf16 autocast) on a mid-size BLIP: it runs, the mask
   gradients are finite, and its time next to the fp32 step.
2. PyTorch FP16 latency (SDPA attention) of the original ViT-B/16-sized model vs slimmed at
   p = 0.5, with head sizes aligned to multiples of 8 (profile h100) and unaligned (no profile):
   fused attention kernels want head_dim % 8 == 0.

    python benchmarks/gpu_check.py [--batch 32] [--runs 50]
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

import upop
from upop.adapters import get_adapter
from upop.config import SearchConfig
from upop.latency import percentile, time_fn
from upop.masks import MaskSet


def search_step_times(device: torch.device) -> dict[str, float]:
    adapter = get_adapter("blip")
    model = adapter.build("BlipForImageTextRetrieval", adapter.random_config(
        "BlipForImageTextRetrieval", hidden=384, layers=6, heads=6, image_size=224, patch_size=16, vocab=1000)).to(device)
    batch = adapter.example_inputs(model, batch_size=8, seq_len=32, generator=torch.Generator().manual_seed(0))
    out = {}
    for amp in (False, True):
        masks = MaskSet(model, adapter.modules(model), "dim")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            adapter.native_loss(model, batch).backward()  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            model.zero_grad(set_to_none=True)
            for _s, z in masks.items():
                z.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                loss = adapter.native_loss(model, batch)
            loss.backward()
        torch.cuda.synchronize()
        finite = all(torch.isfinite(z.grad).all() for _s, z in masks.items())
        masks.remove()
        out["amp" if amp else "fp32"] = (time.perf_counter() - t0) / 5 * 1000
        out[f"finite_{'amp' if amp else 'fp32'}"] = float(finite)
    return out


def slim_vit(profile: str | None, device: torch.device):
    adapter = get_adapter("vit")
    cfg = adapter.random_config("ViTForImageClassification", hidden=768, layers=12, heads=12, image_size=224,
                                patch_size=16)
    torch.manual_seed(0)
    model = adapter.build("ViTForImageClassification", cfg).to(device)
    if profile is None:
        return model
    batch = adapter.example_inputs(model, batch_size=4, generator=torch.Generator().manual_seed(0))
    res = upop.compress(model, upop.CompressConfig(ratio=0.5, profile=profile if profile != "none" else None,
                                                   device=str(device),
                                                   search=SearchConfig(steps=4, update_every=1, lr=0.0),
                                                   retrain=upop.RetrainConfig(epochs=0)), batches=[batch])
    return res.model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: this script is for a lent GPU machine")
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    table = Table(title=f"upop GPU check on {name} (torch {torch.__version__})")
    table.add_column("check")
    table.add_column("value", justify="right")
    steps = search_step_times(dev)
    table.add_row("search step fp32, BLIP hidden 384 ×6, batch 8 (ms)", f"{steps['fp32']:.1f}")
    table.add_row("search step AMP bf16 (ms)", f"{steps['amp']:.1f}")
    table.add_row("mask gradients finite under AMP", "yes" if steps["finite_amp"] else "NO")
    adapter = get_adapter("vit")
    for label, prof in (("original ViT-B/16", None), ("slim p=0.5, aligned (h100)", "h100"),
                        ("slim p=0.5, unaligned", "none")):
        model = slim_vit(prof, dev).half().eval()
        dims = sorted({s.head_dim for s in adapter.modules(model) if s.kind == "attn"})
        px = torch.randn(args.batch, 3, 224, 224, device=dev, dtype=torch.half)
        with torch.inference_mode():
            ms = time_fn(lambda: model(pixel_values=px), 10, args.runs, cuda=True)
        table.add_row(f"{label}: FP16 p50 ms at batch {args.batch} (head_dims {dims[:4]}{'...' if len(dims) > 4 else ''})",
                      f"{percentile(ms, 0.5):.2f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
