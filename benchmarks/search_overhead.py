"""Search overhead and what slimming buys, per family, on a mid-size config.

For every registered family: time per training step of the masked model during the search
(forward + backward + mask-gradient accumulation, as in ``upop.pruning.search``) against the plain
model, then parameters and FLOPs (``torch.utils.flop_counter``, eager attention) of the
original and of the model slimmed at p = 0.5. Random weights and inputs: the numbers are
about cost, not accuracy.

    python benchmarks/search_overhead.py [--hidden 384 --layers 6 --image 224 --steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from upop.adapters import all_adapters
from upop.run.config import SearchConfig
from upop.pruning.flops import flops_per_tower
from upop.pruning.masks import MaskSet
from upop.pruning.search import search
from upop.pruning.slim import slim_model


def step_time(adapter, model, batch, steps: int, masked: bool) -> float:
    masks = MaskSet(model, adapter.modules(model), "dim") if masked else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    times = []
    model.train()
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = adapter.native_loss(model, batch)
        if masks is not None:
            loss = loss + 1e-4 * masks.sparsity("attn") + 1e-4 * masks.sparsity("mlp")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if masks is not None:
            _acc = torch.cat([z.grad.detach().double() for _s, z in masks.items()])
            for _s, z in masks.items():
                z.grad = None
        opt.step()
        if i > 0:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    if masks is not None:
        masks.remove()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table = Table(title=f"search overhead and slimming at p=0.5 — hidden {args.hidden}, {args.layers} layers, "
                        f"{args.image} px, batch {args.batch}, {args.threads} CPU threads")
    for col in ("model", "plain step s", "masked step s", "overhead", "params orig", "params slim",
                "GFLOPs orig", "GFLOPs slim", "FLOPs kept"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for adapter in all_adapters():
        for cls in adapter.classes:
            torch.manual_seed(0)
            cfg = adapter.random_config(cls, hidden=args.hidden, layers=args.layers, heads=args.heads,
                                        image_size=args.image, patch_size=16, vocab=1000)
            model = adapter.build(cls, cfg)
            g = torch.Generator().manual_seed(0)
            batch = adapter.example_inputs(model, batch_size=args.batch, seq_len=32, generator=g)
            plain = step_time(adapter, model, batch, args.steps, masked=False)
            masked = step_time(adapter, model, batch, args.steps, masked=True)
            one = adapter.example_inputs(model, batch_size=1, seq_len=32, generator=torch.Generator().manual_seed(1))
            p0 = sum(p.numel() for p in model.parameters())
            f0 = flops_per_tower(model, adapter, one)["total"]
            specs = adapter.modules(model)
            res = search(model, specs, adapter.native_loss, [batch],
                         SearchConfig(ratio=0.5, steps=2, update_every=1, lr=0.0))
            slim_model(model, specs, res.kept, "dim", adapter, zeta=res.zeta)
            p1 = sum(p.numel() for p in model.parameters())
            f1 = flops_per_tower(model, adapter, one)["total"]
            table.add_row(cls, f"{plain:.3f}", f"{masked:.3f}", f"{masked / plain:.3f}×", f"{p0 / 1e6:.2f}M",
                          f"{p1 / 1e6:.2f}M", f"{f0 / 1e9:.2f}", f"{f1 / 1e9:.2f}", f"{f1 / f0:.1%}")
            Console(stderr=True).print(f"done {cls}", style="dim")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
