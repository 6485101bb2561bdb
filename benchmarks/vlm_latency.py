"""Decoder VLM deployment latency, original vs slim 0.5 widths, at SmolVLM-256M's shape, in ONNX Runtime on the CPU.

The model is transformers' Idefics3ForConditionalGeneration built from SmolVLM-256M's published config shape
(written below, no download) with random weights (normal, std 0.02; norms 1, biases 0): latency does not depend on the
weights' values. Both models are exported with upop's decoder-VLM graphs (vision tower + projector, token embeddings,
language-model prefill and decode step with a KV cache, each parity-checked against PyTorch at batch 1) and timed in
ONNX Runtime (``--threads`` intra-op threads, batch 1; p50 over interleaved rounds): image encode (one image), prefill
at each ``--prompts`` length, one decode step at a past of each length, and its tokens/s.

Slim 0.5 widths, cut out of the original's weights as upop's slim step cuts them (whole units, per layer): half the
vision heads (6 of 12) and vision MLP channels, half the LM's gated-MLP channels, and half the LM's KV groups on
average (whole groups with their query heads: 3 groups cannot halve in every layer, so even layers keep 1 of 3 and odd
layers 2 of 3). Hidden widths, embeddings and the projector stay (they are the interfaces).

    python benchmarks/vlm_latency.py                  # SmolVLM-256M shape (about 1 GB of fp32 graphs per model)
    python benchmarks/vlm_latency.py --small          # a small shape: checks that the script runs

Both models are prepared first (exported, sessions open), then timed in interleaved rounds, stage by stage.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers as tf
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from upop.adapters.vlm_graphs import DecoderGraphs
from upop.exporters.onnx import export_graph
from upop.exporters.sessions import ort_session

#: SmolVLM-256M's shape: these values are the published config's (HuggingFaceTB/SmolVLM-256M-Instruct): a SigLIP-like
#: vision tower and a Llama-like language model
SMOLVLM_256M = {
    "vision": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   patch_size=16, image_size=512),
    "text": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, intermediate_size=1536, vocab_size=49280),
    "scale_factor": 4,
}
#: the same structure, small: 4 vision heads and 3 KV groups of 3 query heads, 64 px images
SMALL = {
    "vision": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, patch_size=8,
                   image_size=64),
    "text": dict(model_type="llama", hidden_size=72, num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=96, vocab_size=512),
    "scale_factor": 2,
}
STD = 0.02
#: set here, not taken from the published config: room for the longest prompt timed, a separate LM head (as counted
#: in the table's params), and the last vocabulary id as the image token
OURS = dict(max_position_embeddings=2048, tie_word_embeddings=False)


def build(shape: dict) -> nn.Module:
    cfg = tf.Idefics3Config(vision_config=shape["vision"], text_config={**shape["text"], **OURS},
                            scale_factor=shape["scale_factor"], image_token_id=shape["text"]["vocab_size"] - 1,
                            tie_word_embeddings=False)
    model = tf.Idefics3ForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(STD * torch.randn(p.shape, generator=g))
    model.set_attn_implementation("eager")
    return model.eval()


def _keep(lin: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    lin.weight = nn.Parameter(lin.weight.data.index_select(dim, idx).clone())
    if dim == 0 and lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.data[idx].clone())
    if dim == 0:
        lin.out_features = len(idx)
    else:
        lin.in_features = len(idx)


def _heads(units: range, width: int) -> torch.Tensor:
    return torch.cat([torch.arange(u * width, (u + 1) * width) for u in units])


def _half_mlp(up: list[nn.Linear], down: nn.Linear) -> None:
    keep = torch.arange(down.in_features // 2)
    for lin in up:
        _keep(lin, keep, 0)
    _keep(down, keep, 1)


def slim_half(model: Any) -> Any:
    """The slim 0.5 widths model described in the module's docstring, cut in place."""
    for layer in model.model.vision_model.encoder.layers:
        attn = layer.self_attn
        heads = _heads(range(attn.num_heads // 2), attn.head_dim)
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            _keep(lin, heads, 0)
        _keep(attn.out_proj, heads, 1)
        _half_mlp([layer.mlp.fc1], layer.mlp.fc2)
    for i, layer in enumerate(model.model.text_model.layers):
        attn, hd = layer.self_attn, layer.self_attn.head_dim
        groups = attn.k_proj.out_features // hd
        kept = range(groups // 2 if i % 2 == 0 else groups - groups // 2)
        per = attn.num_key_value_groups
        _keep(attn.q_proj, _heads(range(len(kept) * per), hd), 0)
        _keep(attn.o_proj, _heads(range(len(kept) * per), hd), 1)
        for lin in (attn.k_proj, attn.v_proj):
            _keep(lin, _heads(kept, hd), 0)
        _half_mlp([layer.mlp.gate_proj, layer.mlp.up_proj], layer.mlp.down_proj)
    return model


def _run_times(sess, feed: dict[str, np.ndarray], runs: int) -> list[float]:
    sess.run(None, feed)  # warm: the first call of a shape allocates
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return times


def flops(module: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*inputs.values())
    return counter.get_total_flops()


def prepare(model: nn.Module, prompts: list[int], threads: int, folder: Path) -> tuple[dict, dict]:
    """Params, FLOPs, each graph's parity at batch 1, and the (session, feed) of every timed stage."""
    dg = DecoderGraphs(model)
    graphs = {g.name: g for g in dg.graphs()}
    info: dict = {"params": sum(p.numel() for p in model.parameters()), "parity_max_abs": {}}
    sessions = {}
    for name, graph in graphs.items():
        entry = export_graph(graph, folder, seq=8, check_batches=(1,))
        info["parity_max_abs"][name] = max(p["max_abs"] for p in entry["parity"])
        sessions[name] = ort_session(folder / entry["file"], threads=threads)
    torch.manual_seed(0)
    image = graphs["vision_encoder"].make_inputs(1, 1)
    info["image_tokens"] = int(graphs["vision_encoder"].module(*image.values()).shape[1])
    info["image_encode_gflops"] = flops(graphs["vision_encoder"].module, image) / 1e9
    stages = {"image_encode": (sessions["vision_encoder"], {k: v.numpy() for k, v in image.items()})}
    for n in prompts:
        prompt = dg.prompt(1, n)
        info[f"prefill_{n}_gflops"] = flops(graphs["decoder_prefill"].module, prompt) / 1e9
        stages[f"prefill_{n}"] = (sessions["decoder_prefill"], {k: v.numpy() for k, v in prompt.items()})
        step = dg.step_inputs(1, n)  # one token after a past of n
        info[f"decode_{n}_gflops"] = flops(graphs["decoder_step"].module, step) / 1e9
        stages[f"decode_{n}"] = (sessions["decoder_step"], {k: v.numpy() for k, v in step.items()})
    return info, stages


def interleaved(prepared: dict[str, tuple[dict, dict]], runs: int, rounds: int) -> None:
    """p50 ms of every stage of every model, timed in rounds that alternate the models stage by stage (drift on the
    machine falls on both alike); a decode stage's tokens/s beside it. Written into each model's info."""
    times: dict[str, dict[str, list[float]]] = {name: {} for name in prepared}
    for _ in range(rounds):
        for stage in next(iter(prepared.values()))[1]:
            for name, (_info, stages) in prepared.items():
                sess, feed = stages[stage]
                times[name].setdefault(stage, []).extend(_run_times(sess, feed, runs))
    for name, (info, _stages) in prepared.items():
        for stage, ts in times[name].items():
            info[f"{stage}_ms"] = statistics.median(ts) * 1000
            if stage.startswith("decode_"):
                info[f"{stage}_tokens_s"] = 1000.0 / info[f"{stage}_ms"]


def table(results: dict[str, dict], prompts: list[int], title: str) -> Table:
    t = Table(title=title)
    t.add_column("metric")
    for name in results:
        t.add_column(name, justify="right")
    t.add_column("slim / original", justify="right")
    rows = [("params (M)", "params", 1e-6), ("image tokens", "image_tokens", 1), ("image encode ms", "image_encode_ms", 1),
            ("image encode GFLOPs", "image_encode_gflops", 1)]
    for n in prompts:
        rows += [(f"prefill {n} tok ms", f"prefill_{n}_ms", 1), (f"prefill {n} tok GFLOPs", f"prefill_{n}_gflops", 1),
                 (f"decode ms/token @past {n}", f"decode_{n}_ms", 1), (f"decode tokens/s @past {n}", f"decode_{n}_tokens_s", 1),
                 (f"decode GFLOPs/token @past {n}", f"decode_{n}_gflops", 1)]
    orig, slim = results["original"], results["slim 0.5"]
    for label, key, scale in rows:
        t.add_row(label, *(f"{r[key] * scale:.4g}" for r in results.values()), f"{slim[key] / orig[key]:.3f}")
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a small shape of the same structure (a quick check)")
    ap.add_argument("--prompts", nargs="*", type=int, default=[64, 256])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per stage and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds alternating the models stage by stage")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()
    shape = SMALL if args.small else SMOLVLM_256M
    with tempfile.TemporaryDirectory() as tmp:
        prepared = {}
        for name in ("original", "slim 0.5"):
            model = build(shape)
            if name == "slim 0.5":
                model = slim_half(model)
            (Path(tmp) / name).mkdir()
            prepared[name] = prepare(model, args.prompts, args.threads, Path(tmp) / name)
            del model
            gc.collect()
        interleaved(prepared, args.runs, args.rounds)
        results = {name: info for name, (info, _stages) in prepared.items()}
    title = (f"{'small shape' if args.small else 'SmolVLM-256M shape'}, random weights: ONNX Runtime CPU, "
             f"{args.threads} threads, batch 1, p50 of {args.rounds} interleaved rounds × {args.runs} runs")
    Console().print(table(results, args.prompts, title))
    for name, r in results.items():
        print(f"{name}: parity max abs per graph (batch 1) {json.dumps({k: f'{v:.1e}' for k, v in r['parity_max_abs'].items()})}")
    if args.json:
        args.json.write_text(json.dumps({"shape": shape, "threads": args.threads, "runs": args.runs, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
