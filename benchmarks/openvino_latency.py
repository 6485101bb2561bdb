"""OpenVINO beside ONNX Runtime on the CPU: the same exported graphs, p50 / p90 ms per graph, batch 1 and 8.

Each model is exported once with ``upop export --format openvino`` (its ONNX graphs in ``onnx/``, the IR converted
from them and checked against PyTorch); ONNX Runtime runs those ONNX graphs, OpenVINO their IR, on the same
synthetic inputs. The runs are interleaved: every round times every model, graph, batch and runtime once for
``--runs`` runs, so a load that comes and goes falls on both runtimes alike.

Models: the demos (demo-vit, demo-clip, demo-blip), original and slim at ratio 0.5, and BLIP-base size (ViT-B/16 +
BERT-base retrieval, random weights with init std 0.02, ``--base-image-size`` px), original and slim 0.5. A slim
model here is 2 search steps at lr 0 and no retraining: which units are kept does not change the latency.

    python benchmarks/openvino_latency.py [--rounds 3] [--runs 10] [--skip-demos] [--skip-base] [--json FILE]
    python benchmarks/openvino_latency.py --tables FILE [--markdown]   (the tables again, from the rows of --json FILE)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import upop
from upop.exporters import backend
from upop.exporters.runtimes.openvino import OvSession
from upop.exporters.runtimes.openvino import _io_names as io_names
from upop.exporters.sessions import ort_session, synthetic_feed
from upop.models.hub import load_pretrained
from upop.latency.timing import percentile, time_fn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_size import write_model  # noqa: E402  (the BLIP-base-size model of that benchmark)

DEMOS = ["demo-vit", "demo-clip", "demo-blip"]
BATCHES = (1, 8)


def slim(source: str | Path, out: Path) -> Path:
    loaded = load_pretrained(str(source))
    model, adapter = loaded.model.eval(), loaded.adapter
    g = torch.Generator().manual_seed(0)
    batches = [adapter.example_inputs(model, batch_size=2, seq_len=32, generator=g)]
    cfg = upop.CompressConfig(ratio=0.5, search=upop.SearchConfig(steps=2, update_every=1, lr=0.0),
                              retrain=upop.RetrainConfig(epochs=0))
    return Path(upop.compress(model, cfg, batches=batches, latency=False).save(out, with_report=False))


def sessions(export: Path) -> list[tuple[dict, dict]]:
    """Per graph: its export.json entry and the two runtimes' sessions on the same graph."""
    manifest = json.loads((export / "onnx" / "export.json").read_text())
    ir = {g["name"]: g["file"] for g in json.loads((export / "openvino.json").read_text())["graphs"]}
    return [(g, {"onnxruntime": ort_session(export / "onnx" / g["file"]),
                 "openvino": OvSession(export / ir[g["name"]], io_names(g))}) for g in manifest["graphs"]]


#: one timed run of a session on a feed: OpenVINO's sets its input tensors once (what its profile times)
CALL = {"onnxruntime": lambda sess, feed: lambda: sess.run(None, feed), "openvino": lambda sess, feed: sess.call(feed)}


def measure(models: dict[str, Path], rounds: int, runs: int, console: Console) -> list[dict]:
    """Interleaved: each round times every model, graph, batch and runtime ``runs`` times."""
    cells = []
    for label, export in models.items():
        for g, sess in sessions(export):
            for b in BATCHES:
                for rt, s in sess.items():
                    cells.append({"model": label, "graph": g["name"], "batch": b, "runtime": rt,
                                  "fn": CALL[rt](s, synthetic_feed(g, s, b)), "ms": []})
    for r in range(rounds):
        console.log(f"round {r + 1}/{rounds}: {len(cells)} cells")
        for c in cells:
            c["ms"] += time_fn(c["fn"], 1, runs, cuda=False)  # one warm-up run per cell and round
    return [{k: v for k, v in c.items() if k != "fn"} | {"p50_ms": percentile(c["ms"], 0.5),
                                                          "p90_ms": percentile(c["ms"], 0.9)} for c in cells]


def table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("model", "graph", "batch", "ORT p50 / p90 ms", "OpenVINO p50 / p90 ms", "ORT / OpenVINO"):
        t.add_column(col, justify="left" if col in ("model", "graph") else "right")
    pairs: dict[tuple, dict] = {}
    for r in rows:
        pairs.setdefault((r["model"], r["graph"], r["batch"]), {})[r["runtime"]] = r
    for (model, graph, b), p in pairs.items():
        o, v = p["onnxruntime"], p["openvino"]
        t.add_row(model, graph, str(b), f"{o['p50_ms']:.2f} / {o['p90_ms']:.2f}", f"{v['p50_ms']:.2f} / {v['p90_ms']:.2f}",
                  f"{o['p50_ms'] / v['p50_ms']:.2f}×")
    return t


def total_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Per model, every graph once (the sum of their p50s), what a request through the whole model costs."""
    head = ["model", *(f"{rt} batch {b}" for b in BATCHES for rt in ("ORT", "OpenVINO")),
            *(f"ORT / OpenVINO batch {b}" for b in BATCHES)]
    sums: dict[str, dict[tuple[str, int], float]] = {}
    for r in rows:
        cell = sums.setdefault(r["model"], {})
        cell[(r["runtime"], r["batch"])] = cell.get((r["runtime"], r["batch"]), 0.0) + r["p50_ms"]
    body = [[model, *(f"{s[(rt, b)]:.2f}" for b in BATCHES for rt in ("onnxruntime", "openvino")),
             *(f"{s[('onnxruntime', b)] / s[('openvino', b)]:.2f}×" for b in BATCHES)] for model, s in sums.items()]
    return head, body


def totals(rows: list[dict], title: str) -> Table:
    head, body = total_rows(rows)
    t = Table(title=title)
    for col in head:
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in body:
        t.add_row(*r)
    return t


def markdown(rows: list[dict]) -> str:
    """The per-model table as README markdown."""
    head, body = total_rows(rows)
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in body)])


def exports(args, root: Path, console: Console) -> dict[str, Path]:
    ov = backend("openvino")
    sources: dict[str, str | Path] = {}
    if not args.skip_demos:
        for demo in DEMOS:
            sources[f"{demo} original"] = demo
            sources[f"{demo} slim 0.5"] = slim(demo, root / f"{demo}-slim")
    if not args.skip_base:
        console.log(f"BLIP-base size at {args.base_image_size} px: writing and slimming the model")
        orig = write_model(root / "base", args.base_image_size)[0]
        sources["BLIP-base original"] = orig
        sources["BLIP-base slim 0.5"] = slim(orig, root / "base-slim")
    out = {}
    for i, (label, src) in enumerate(sources.items()):
        console.log(f"exporting {label} (ONNX, then OpenVINO IR checked against PyTorch)")
        out[label] = root / f"export-{i}"
        ov.export(src, out[label])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=10, help="timed runs per cell and round")
    ap.add_argument("--skip-demos", action="store_true")
    ap.add_argument("--skip-base", action="store_true")
    ap.add_argument("--base-image-size", type=int, default=384)
    ap.add_argument("--json", dest="json_out", default=None, help="also write the raw rows here")
    ap.add_argument("--tables", default=None, help="only print the tables of rows written by --json before")
    ap.add_argument("--markdown", action="store_true", help="the per-model table as markdown too")
    args = ap.parse_args()
    if args.tables:
        rows = json.loads(Path(args.tables).read_text())
        how = f"rows of {args.tables}"
    else:
        backend("openvino").require()
        console = Console(stderr=True)
        with tempfile.TemporaryDirectory() as tmp:
            rows = measure(exports(args, Path(tmp), console), args.rounds, args.runs, console)
        how = f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds × {args.runs} runs"
    out = Console(width=170)
    out.print(table(rows, f"CPU p50 / p90 ms, ONNX Runtime vs OpenVINO on the same graphs ({how})"))
    out.print(totals(rows, f"CPU p50 ms of every graph once, ONNX Runtime vs OpenVINO ({how})"))
    if args.markdown:
        print(markdown(rows))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([{k: v for k, v in r.items() if k != "ms"} for r in rows], indent=1))


if __name__ == "__main__":
    main()
