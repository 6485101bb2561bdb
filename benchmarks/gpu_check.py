"""GPU checks in one go (for a lent H100/H200, a few minutes): prints one table.

1. A search step with AMP on CUDA (bf16 autocast) on a mid-size BLIP: it runs, the mask
   gradients are finite, and its time next to the fp32 step.
2. PyTorch FP16 latency (SDPA attention) of the original ViT-B/16-sized model vs slimmed at
   p = 0.5, with head sizes aligned to multiples of 8 (profile h100) and unaligned (no profile):
   fused attention kernels want head_dim % 8 == 0.
3. The AMP dtype upop picks here (bf16 only where the GPU has it natively, else fp16 with a grad scaler),
   with what PyTorch reports with and without emulation.
4. BLIP retrieval evaluation in one process on the GPU (ITC, then ITM re-ranking): it runs, and its peak
   CUDA memory at a BLIP-base size (ViT-B/16 at 384 px: 577 image tokens) for two test splits, one four
   times the other: the image sequences are held one chunk at a time, so the peak should barely grow.
5. ONNX Runtime: the provider really in use (a CUDA provider that fails to load falls back to the CPU),
   and its latency with IO binding (inputs on the device) next to PyTorch's (CUDA events), ViT-B/16 fp32.
6. TensorRT (when installed): an engine built for a static-shape ViT-S/16 and timed on its own stream;
   the model is still on the GPU afterwards.

    python benchmarks/gpu_check.py [--batch 32] [--runs 50] [--eval-images 256]
    python benchmarks/gpu_check.py --dry-run   # the same code on the CPU at toy sizes (no GPU needed)
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

import upop
from upop.adapters import get_adapter
from upop.run.config import SearchConfig
from upop.latency.timing import percentile, time_fn
from upop.pruning.masks import MaskSet


def search_step_times(device: torch.device) -> dict[str, float]:
    adapter = get_adapter("blip")
    model = adapter.build("BlipForImageTextRetrieval", adapter.random_config(
        "BlipForImageTextRetrieval", hidden=384, layers=6, heads=6, image_size=224, patch_size=16, vocab=1000)).to(device)
    batch = adapter.example_inputs(model, batch_size=8, seq_len=32, generator=torch.Generator().manual_seed(0))
    masks = MaskSet(model, adapter.modules(model), "dim")

    def step(amp: bool) -> None:
        model.zero_grad(set_to_none=True)
        for _s, z in masks.items():
            z.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            adapter.native_loss(model, batch).backward()

    step(False)  # warm-up, both ways
    step(True)
    secs = {False: 0.0, True: 0.0}
    finite = {False: True, True: True}
    for _round in range(5):  # interleaved, so a clock or thermal drift hits both alike
        for amp in (False, True):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(amp)
            torch.cuda.synchronize()
            secs[amp] += time.perf_counter() - t0
            finite[amp] &= all(bool(torch.isfinite(z.grad).all()) for _s, z in masks.items())
    masks.remove()
    out = {}
    for amp, key in ((False, "fp32"), (True, "amp")):
        out[key] = secs[amp] / 5 * 1000
        out[f"finite_{key}"] = float(finite[amp])
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
                                                   retrain=upop.RetrainConfig(epochs=0)), batches=[batch],
                        latency=False)
    return res.model


def amp_choice(device: torch.device) -> str:
    """The AMP dtype upop trains in here, and why."""
    from upop.training.parts import amp_dtype, bf16_native, grad_scaler

    if device.type != "cuda":
        return "none on the CPU"
    dtype = amp_dtype(device, True)
    cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
    scaler = "with" if grad_scaler(device, dtype) is not None else "without"
    return (f"{str(dtype).replace('torch.', '')} {scaler} a grad scaler (compute capability {cap}; bf16 native: "
            f"{bf16_native()}, with emulation: {torch.cuda.is_bf16_supported()})")


def _peak_mib(device: torch.device, fn) -> tuple[object, float, float]:
    """fn()'s result, its peak CUDA memory above what was allocated before (MiB), and its seconds."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return out, (torch.cuda.max_memory_allocated(device) - base) / 2**20, time.perf_counter() - t0
    return out, float("nan"), time.perf_counter() - t0


def blip_evaluation(device: torch.device, images: int, k_test: int, dry: bool) -> tuple[dict, float, float]:
    """BLIP retrieval evaluated in one process on ``device`` over a generated test split of ``images`` images
    (the shapes set's captions), a random BLIP-base-sized model (ViT-B/16 at 384 px): (metrics and the caption
    count, peak MiB, seconds)."""
    import tempfile

    from upop.datasets import shapes
    from upop.models.demo import build_tokenizer
    from upop.tasks import Preprocessor, make_task

    adapter = get_adapter("blip")
    tok = build_tokenizer()
    sizes = dict(hidden=32, layers=2, heads=4, image_size=32, patch_size=8) if dry else \
        dict(hidden=768, layers=12, heads=12, image_size=384, patch_size=16)
    torch.manual_seed(0)
    model = adapter.build("BlipForImageTextRetrieval", adapter.random_config(
        "BlipForImageTextRetrieval", vocab=len(tok), **sizes)).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        data = shapes(f"{tmp}/d", train=2, val=2, test=images, image_size=64, classification_per_class=(1, 1, 1))
        prep = Preprocessor(tok, adapter.image_processor(sizes["image_size"]), **adapter.preprocessor_options(model))
        task = make_task(adapter, "retrieval", prep, data, model=model, workers=0, k_test=k_test)
        texts = sum(len(r.captions) for r in task._records("test"))
        with torch.no_grad():
            metrics, peak, secs = _peak_mib(device, lambda: task.evaluate(model, "test"))
        return {**metrics, "texts": texts}, peak, secs  # type: ignore[dict-item]


def ort_vs_torch(device: torch.device, batch: int, dry: bool) -> dict[str, object]:
    """ViT-B/16 fp32 at ``batch``: PyTorch p50 (CUDA events) and ONNX Runtime p50 (IO binding on CUDA), and
    where ONNX Runtime really ran."""
    from upop.exporters.timing import ort_runtime
    from upop.latency.measure import time_model, torch_runtime

    adapter = get_adapter("vit")
    sizes = dict(hidden=32, layers=2, heads=4, image_size=32, patch_size=8) if dry else \
        dict(hidden=768, layers=12, heads=12, image_size=224, patch_size=16)
    model = adapter.build("ViTForImageClassification", adapter.random_config("ViTForImageClassification", **sizes))
    model = model.to(device).eval()
    pt = time_model(model, adapter, batch, device, torch_runtime(device))
    ort = time_model(model, adapter, batch, device, ort_runtime(device))
    return {"torch": pt["p50_ms"], "ort": ort["p50_ms"], "ort_device": ort.get("device", "?"),
            "model_on": str(next(model.parameters()).device)}


def tensorrt_on_stream(device: torch.device, batch: int) -> str:
    """A ViT-S/16 fp16 engine for static shapes, timed on the runner's own stream; the model stays on the GPU."""
    from upop.exporters.tensorrt import engine_latency, require_tensorrt

    trt = require_tensorrt()
    adapter = get_adapter("vit")
    model = adapter.build("ViTForImageClassification", adapter.random_config(
        "ViTForImageClassification", hidden=384, layers=12, heads=6, image_size=224, patch_size=16)).to(device).eval()
    px = torch.randn(batch, 3, 224, 224, device=device)
    ms = engine_latency(model, {"pixel_values": px}, fp16=True, warmup=5, runs=30, pick=lambda out: out.logits)
    return (f"p50 {percentile(ms, 0.5):.2f} ms (TensorRT {trt.__version__}); model after: "
            f"{next(model.parameters()).device}")


def add(table: Table, check: str, value: str) -> None:
    """A row of the table, also printed at once: a check cut off by a time limit keeps the rows before it."""
    print(f"  {check}: {value}", flush=True)
    table.add_row(check, value)


def _attempt(fn, *args):
    """fn(*args), or the error in one line (one failed check must not hide the others)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001  (reported in the table)
        return f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def issue_checks(table: Table, dev: torch.device, args: argparse.Namespace) -> None:
    """Checks 3-6 (see the module's docstring)."""
    add(table, "AMP dtype chosen", _attempt(amp_choice, dev))
    sizes = (6, 12) if args.dry_run else (args.eval_images, 4 * args.eval_images)
    for n in sizes:
        res = _attempt(blip_evaluation, dev, n, 16, args.dry_run)
        if isinstance(res, str):
            add(table, f"BLIP retrieval evaluation, 1 process, {n} test images", res)
            continue
        metrics, peak, secs = res
        add(table, f"BLIP retrieval evaluation, 1 process, {n} test images, {metrics['texts']:.0f} captions, "
                      "k_test 16: R-mean / peak CUDA MiB / s", f"{metrics['r_mean']:.1f} / {peak:,.0f} / {secs:.0f}")
    res = _attempt(ort_vs_torch, dev, 8 if not args.dry_run else 2, args.dry_run)
    if isinstance(res, str):
        add(table, "ONNX Runtime vs PyTorch", res)
    else:
        add(table, "ONNX Runtime ran on (provider in use)", str(res["ort_device"]))
        add(table, "ViT-B/16 fp32 batch 8 p50 ms: PyTorch (CUDA events) / ORT (IO binding)",
                      f"{res['torch']:.2f} / {res['ort']:.2f}")
        add(table, "model's device after the ORT export", str(res["model_on"]))
    if dev.type == "cuda":
        add(table, "TensorRT ViT-S/16 fp16 batch 8 on its own stream", _attempt(tensorrt_on_stream, dev, 8))
    else:
        add(table, "TensorRT", "skipped (CPU dry run)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--eval-images", type=int, default=256, help="the smaller evaluation split (the larger is 4x)")
    ap.add_argument("--dry-run", action="store_true", help="checks 3-6 on the CPU at toy sizes (tests this script)")
    args = ap.parse_args()
    if args.dry_run:
        table = Table(title=f"upop GPU check, CPU dry run (torch {torch.__version__})")
        table.add_column("check")
        table.add_column("value", justify="right")
        issue_checks(table, torch.device("cpu"), args)
        Console(width=160).print(table)
        return
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: this script is for a lent GPU machine (--dry-run runs it on the CPU)")
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    table = Table(title=f"upop GPU check on {name} (torch {torch.__version__})")
    table.add_column("check")
    table.add_column("value", justify="right")
    issue_checks(table, dev, args)
    steps = _attempt(search_step_times, dev)
    if isinstance(steps, str):
        add(table, "search step, BLIP hidden 384 ×6, batch 8", steps)
    else:
        add(table, "search step fp32, BLIP hidden 384 ×6, batch 8 (ms)", f"{steps['fp32']:.1f}")
        add(table, "search step AMP bf16 (ms)", f"{steps['amp']:.1f}")
        add(table, "mask gradients finite under AMP", "yes" if steps["finite_amp"] else "NO")
    for label, prof in (("original ViT-B/16", None), ("slim p=0.5, aligned (h100)", "h100"),
                        ("slim p=0.5, unaligned", "none")):
        res = _attempt(fp16_latency, prof, dev, args)
        add(table, f"{label}: FP16 p50 ms at batch {args.batch}" + ("" if isinstance(res, str) else f" (head_dims {res[1]})"),
            res if isinstance(res, str) else f"{res[0]:.2f}")
    Console(width=160).print(table)


def fp16_latency(profile: str | None, dev: torch.device, args: argparse.Namespace) -> tuple[float, str]:
    """The p50 ms of a (slim) ViT-B/16 in FP16 at ``args.batch``, and its head sizes."""
    adapter = get_adapter("vit")
    model = slim_vit(profile, dev).half().eval()
    dims = sorted({s.head_dim for s in adapter.modules(model) if s.kind == "attn"})
    px = torch.randn(args.batch, 3, 224, 224, device=dev, dtype=torch.half)
    with torch.inference_mode():
        ms = time_fn(lambda: model(pixel_values=px), 10, args.runs, cuda=True)
    return percentile(ms, 0.5), f"{dims[:4]}{'...' if len(dims) > 4 else ''}"


if __name__ == "__main__":
    main()
