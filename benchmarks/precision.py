"""Precisions stacked on the pruning: fp32 / fp16 / int8 / int8-dynamic ONNX graphs, original and slim.

Part 1, the demos (demo-vit, demo-clip, demo-blip) at ratio 0 (the demo as shipped) and 0.5 (``upop
compress`` on the demo's data): per precision the task metric on val and test (through ``upop eval``
of the export where this build has it; otherwise the cosine of the graphs' outputs to PyTorch on the
parity inputs), the size on disk, and ONNX Runtime CPU latency (every graph once, p50) at batch 1 and 8,
timed in interleaved rounds (``upop.exporters.precision.measure_latency``).

Part 2, BLIP-base size (ViT-B/16 + BERT-base, random weights with init std 0.02: latency and size only):
original fp32 → slim 0.5 fp32 → slim 0.5 int8 and int8-dynamic, per graph, at batch 1 and 8, interleaved;
int8 calibrated on synthetic images. The aim (issue 22): slim 0.5 + INT8 at least 4× faster than the
original fp32 on every graph at batch 8.

    python benchmarks/precision.py                       # the full run (tens of minutes on 2 cores)
    python benchmarks/precision.py --dry-run             # small: few steps, a small BLIP, few timings
    python benchmarks/precision.py --skip-demos | --skip-base

Needs no network. Prints two tables; never a pass/fail on wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from upop.exporters.onnx import export_onnx
from upop.exporters.evaluate import task_metric
from upop.exporters.precision import PrecisionOptions, calibration_task, measure_latency
from upop.exporters.quantize import Calibration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_size import CLASS, write_data, write_model  # noqa: E402  (the BLIP-base-size model and data of that benchmark)

DEMOS = ["demo-vit", "demo-clip", "demo-blip"]
QUANT = ("fp16", "int8", "int8-dynamic")


def slim_demo(demo: str, root: Path, max_steps: int | None, eval_limit: int | None) -> Path:
    """``upop compress`` of the demo at ratio 0.5 on its own data (the CLI, as a user runs it)."""
    out = root / f"{demo}-p0.5"
    cmd = [sys.executable, "-m", "upop_cli", "compress", "--model", demo, "--ratio", "0.5", "--out", str(out), "--quiet"]
    if max_steps:
        cmd += ["--max-steps", str(max_steps)]
    if eval_limit:
        cmd += ["--eval-limit", str(eval_limit), "--no-latency"]
    subprocess.run(cmd, check=True)
    return out


def demo_rows(args, root: Path, console: Console) -> list[list[str]]:
    rows = []
    metric = task_metric()
    for demo in DEMOS:
        task = calibration_task(demo)
        sources = {"0": demo, "0.5": slim_demo(demo, root, args.max_steps, args.eval_limit)}
        for ratio, src in sources.items():
            opts = PrecisionOptions("fp32", Calibration(size=args.calibration), batch=8, task=task, metric_fn=metric,
                                    rounds=args.rounds, runs=args.runs, also=QUANT)
            console.log(f"{demo} ratio {ratio}: exporting and timing {', '.join(('fp32', *QUANT))}")
            man = export_onnx(src, root / f"{demo}-{ratio}-onnx", precision=opts, overwrite=True)
            for r in man["deployment"]["rows"]:
                m = [f"{r[k]:.2f}" if r.get(k) is not None else "–" for k in ("metric_val", "metric_test")]
                par = r["parity"]
                cos = f"{par['min_cosine']:.4f}" if "min_cosine" in par else f"max abs {par['max_abs']:.0e}"
                rows.append([demo, ratio, r["precision"], *m, cos, f"{r['size_bytes'] / 2**20:.2f}",
                             f"{r['latency']['1']['p50_ms']:.2f}", f"{r['latency']['8']['p50_ms']:.2f}"])
    return rows


def base_size(args, root: Path, console: Console) -> list[list[str]]:
    """BLIP-base size: original fp32 → slim 0.5 fp32 → slim 0.5 int8 / int8-dynamic, per graph."""
    import upop
    from upop.adapters import get_adapter
    from upop.models.hub import load_pretrained

    size = args.base_image_size
    # the dry run: a small BLIP with the same graphs, so it takes seconds
    orig = _small_blip(root / "orig", size) if args.dry_run else write_model(root / "orig", size)[0]
    data = write_data(root / "data", args.base_images)
    model = load_pretrained(str(orig)).model.eval()
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    batches = [adapter.example_inputs(model, batch_size=2, seq_len=32, generator=g)]
    cfg = upop.CompressConfig(ratio=0.5, search=upop.SearchConfig(steps=2, update_every=1, lr=0.0),
                              retrain=upop.RetrainConfig(epochs=0))
    console.log("BLIP-base size: slimming to 0.5 (random weights: what is kept does not matter for latency)")
    slim = Path(upop.compress(model, cfg, batches=batches).save(root / "slim", with_report=False))
    for f in orig.iterdir():  # the processor files: calibration reads images through them
        if f.name.startswith(("tokenizer", "preprocessor", "special_tokens", "vocab")):
            shutil.copy2(f, slim / f.name)
    console.log("exporting the original fp32 graphs")
    orig_man = export_onnx(str(orig), root / "orig-onnx", overwrite=True)
    console.log("exporting the slim graphs, int8 (calibrated) and int8-dynamic")
    task = calibration_task(str(slim), "retrieval", data)
    opts = PrecisionOptions("int8", Calibration(size=args.calibration), batch=8, task=task, rounds=1, runs=1,
                            also=("int8-dynamic",))
    slim_man = export_onnx(str(slim), root / "slim-onnx", precision=opts, overwrite=True)
    rows = []
    for go, gs in zip(orig_man["graphs"], slim_man["graphs"]):
        sets = {"original fp32": (root / "orig-onnx", {"graphs": [go]}, "fp32"),
                "slim fp32": (root / "slim-onnx", {"graphs": [gs]}, "fp32"),
                "slim int8": (root / "slim-onnx", {"graphs": [gs]}, "int8"),
                "slim int8-dynamic": (root / "slim-onnx", {"graphs": [gs]}, "int8-dynamic")}
        console.log(f"timing {go['name']} (interleaved)")
        lat = measure_latency(sets, [1, 8], args.rounds, args.runs)
        base = lat["original fp32"]
        for name, (folder, man, p) in sets.items():
            file = folder / (man["graphs"][0]["file"] if p == "fp32" else man["graphs"][0][p]["file"])
            rows.append([go["name"], name, f"{file.stat().st_size / 2**20:.1f}",
                         *(f"{lat[name][b]['p50_ms']:.1f}" for b in ("1", "8")),
                         *(f"{base[b]['p50_ms'] / lat[name][b]['p50_ms']:.2f}×" for b in ("1", "8"))])
    return rows


def _small_blip(root: Path, size: int) -> Path:
    from upop.adapters import get_adapter
    from upop.models.demo import build_tokenizer
    from upop.tasks import Preprocessor

    adapter = get_adapter("blip")
    tok = build_tokenizer()
    cfg = adapter.small_config(CLASS, hidden=128, layers=2, heads=4, image_size=size, patch_size=16, vocab=30524,
                               token_ids={"bos_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id,
                                          "pad_token_id": tok.pad_token_id})
    torch.manual_seed(0)
    model = adapter.build(CLASS, cfg)
    model.config.architectures = [CLASS]
    model.save_pretrained(root)
    Preprocessor(tok, adapter.image_processor(size)).save_pretrained(root)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="few steps and timings, a small BLIP for part 2")
    ap.add_argument("--skip-demos", action="store_true")
    ap.add_argument("--skip-base", action="store_true")
    ap.add_argument("--max-steps", type=int, default=None, help="cap each demo's search and retrain (default: none)")
    ap.add_argument("--eval-limit", type=int, default=None, help="the demos' compress evaluates on at most N records")
    ap.add_argument("--calibration", type=int, default=128, help="calibration items")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=6, help="timings per round")
    ap.add_argument("--base-image-size", type=int, default=384)
    ap.add_argument("--base-images", type=int, default=40, help="synthetic images of part 2 (calibration draws train)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    if args.dry_run:
        args.max_steps, args.calibration, args.rounds, args.runs = args.max_steps or 2, 8, 1, 2
        args.eval_limit = args.eval_limit or 16
        args.base_image_size, args.base_images = 64, 15
    console = Console(stderr=True)
    out: dict[str, list[list[str]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_demos:
            out["demos"] = demo_rows(args, Path(tmp), console)
            t = Table(title="demos: ONNX Runtime CPU, every graph once (p50 ms), interleaved"
                      + (" — DRY RUN" if args.dry_run else ""))
            for col in ("model", "ratio", "precision", "val", "test", "min cosine", "MiB", "ms @1", "ms @8"):
                t.add_column(col, justify="left" if col in ("model", "precision") else "right")
            for r in out["demos"]:
                t.add_row(*r)
            Console(width=150).print(t)
        if not args.skip_base:
            out["base"] = base_size(args, Path(tmp), console)
            t = Table(title=f"BLIP-base size ({args.base_image_size} px, random weights): per graph, p50 ms, interleaved"
                      + (" — DRY RUN (a small BLIP)" if args.dry_run else ""))
            for col in ("graph", "artifact", "MiB", "ms @1", "ms @8", "speedup @1", "speedup @8"):
                t.add_column(col, justify="left" if col in ("graph", "artifact") else "right")
            for r in out["base"]:
                t.add_row(*r)
            Console(width=150).print(t)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
