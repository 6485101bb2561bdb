"""GPU memory of UPop's mask search on decoder VLMs, computed from the models' config shapes (no download, no GPU).

Each model is built on the meta device from its published config shapes (written below), so its parameters and
units are counted exactly; the memory of one search step on one GPU (DDP keeps a full replica per GPU) is then:

- weights in fp32 (AMP computes in bf16 and keeps fp32 master weights: at the search's lr of 1e-5 an update is
  below bf16's resolution, 2^-8 of the weight, and would be lost), their gradients in fp32, AdamW's two fp32
  states, and the bf16 copies autocast makes of the weights for the forward: 18 bytes per parameter;
- the masks: one fp32 value and gradient per unit (their importance, float64, lives on the CPU);
- activations saved for the backward (bf16 under autocast, the fp32 residual stream and norms, the masks' inputs,
  flash attention: no attention matrix), per token and layer, counted below from what PyTorch saves in a layer of
  each kind (``tests/unit/test_vlm_memory.py`` checks the counts against a layer's saved tensors); with
  ``--grad-checkpointing`` each layer keeps only its fp32 input and one layer is recomputed at a time;
- the logits: bf16, their fp32 copy and the log-softmax the loss keeps, over the whole vocabulary for every token.

Not counted: the CUDA context and allocator slack (a 10% margin is left), the teacher of ``--distill`` (bf16: 2
bytes per parameter more), the data pipeline. Run: ``python benchmarks/vlm_memory.py [--batch 8 --text-tokens 64]``;
on a CUDA GPU ``--measure [MODEL ...]`` also runs a few search steps (random weights) and prints the peak memory.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

GIB = 2**30
GPUS_GB = (24, 40, 80, 141)  # RTX 4090 / L4-class, A100-40G, A100/H100-80G, H200
MARGIN = 0.9  # share of a GPU's memory the run may plan for

#: the published config shapes of each model (the hub's config.json, copied here so nothing is downloaded)
MODELS: dict[str, dict[str, Any]] = {
    "SmolVLM-256M": dict(model_type="idefics3", scale_factor=4, image_token_id=49190, vision_config=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
        image_size=512), text_config=dict(model_type="llama", hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49280,
        tie_word_embeddings=True)),
    "SmolVLM-500M": dict(model_type="idefics3", scale_factor=4, image_token_id=49190, vision_config=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
        image_size=512), text_config=dict(model_type="llama", hidden_size=960, intermediate_size=2560,
        num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, head_dim=64, vocab_size=49280,
        tie_word_embeddings=True)),
    "SmolVLM-2B": dict(model_type="idefics3", scale_factor=3, image_token_id=49153, vision_config=dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14,
        image_size=384), text_config=dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32, head_dim=64, vocab_size=49155,
        tie_word_embeddings=False)),
    "LLaVA-1.5-7B": dict(model_type="llava", image_token_index=32000, vision_feature_layer=-2, vision_config=dict(
        model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, patch_size=14, image_size=336, projection_dim=768), text_config=dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, head_dim=128, vocab_size=32064, tie_word_embeddings=False)),
}


@dataclass
class Shapes:
    """What the memory depends on, read from the model built on the meta device."""

    params: int
    units: int
    vision: tuple[int, int, int, int]  # layers, hidden, intermediate, tokens per image
    language: tuple[int, int, int, int, int, int]  # layers, hidden, intermediate, heads, kv heads, head dim
    image_tokens: int  # tokens one image takes in the LM
    vocab: int


def shapes_of(name: str) -> Shapes:
    from upop.adapters import get_adapter

    data = dict(MODELS[name])
    adapter = get_adapter(data["model_type"])
    with torch.device("meta"):
        model = adapter.build(next(iter(adapter.classes)), adapter.config_from_dict(data))
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    units = sum(s.num_units("dim") for s in adapter.modules(model))
    v, t = model.config.vision_config, model.config.text_config
    return Shapes(params, units,
                  (adapter.vision_layers_used(model), v.hidden_size, v.intermediate_size, adapter.vision_tokens(model)),
                  (t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.num_attention_heads,
                   t.num_key_value_heads, t.head_dim), adapter.lm_image_tokens(model), t.vocab_size)


def vision_layer_bytes(h: int, i: int) -> int:
    """Bytes one vision layer (LayerNorm, MHA, GELU MLP) saves per token: fp32 LayerNorm inputs (2 × 4h), the bf16
    casts of the q/k/v and fc1 inputs (4 × 2h), the masked q/k/v outputs (3 × 2h), flash attention's q, k, v, out
    (4 × 2h), fc1's masked output, the GELU's input and output (3 × 2i). Per-token statistics (LayerNorm's mean and
    rstd, attention's log-sum-exp) are left out: a few bytes per head."""
    return 8 * h + 8 * h + 6 * h + 8 * h + 6 * i


def language_layer_bytes(h: int, i: int, heads: int, kv: int, d: int) -> int:
    """Bytes one decoder layer (RMSNorm, GQA with rotary, SwiGLU) saves per token: the fp32 RMSNorm input and
    normalised output (2 × 2 × 4h), the bf16 casts of the q/k/v and gate/up inputs (5 × 2h), the q/k/v outputs the
    masks keep (2 × (heads + 2·kv)·d), the rotary q/k, the masked v and the attention output flash attention keeps
    (2 × (2·heads + 2·kv)·d), the gate output, up output, masked up, SiLU output and their product (5 × 2i)."""
    return 16 * h + 10 * h + 2 * (3 * heads * d + 4 * kv * d) + 10 * i


def step_gib(s: Shapes, batch: int, text_tokens: int, checkpointing: bool) -> dict[str, float]:
    """GiB of one search step on one GPU, by part."""
    vl, vh, vi, vt = s.vision
    ll, lh, li, heads, kv, d = s.language
    img, lm = batch * vt, batch * (s.image_tokens + text_tokens)  # vision tokens, LM tokens in the batch
    per_v, per_l = vision_layer_bytes(vh, vi), language_layer_bytes(lh, li, heads, kv, d)
    if checkpointing:  # each layer's fp32 input, and one layer's activations while it is recomputed
        acts = vl * img * 4 * vh + ll * lm * 4 * lh + max(img * per_v, lm * per_l)
    else:
        acts = vl * img * per_v + ll * lm * per_l
    return {"weights+grads+adam": 18 * s.params / GIB, "masks": 8 * s.units / GIB, "activations": acts / GIB,
            "logits": lm * s.vocab * (2 + 4 + 4) / GIB}


def measured_gib(name: str, batch: int, text_tokens: int, checkpointing: bool, steps: int = 3) -> float:
    """Peak GiB a few search steps of ``name`` (random weights) take on this CUDA GPU, AMP on, as upop runs them."""
    import upop
    from upop.adapters import get_adapter
    from upop.pruning.search import search
    from upop.training.memory import enable_grad_checkpointing

    adapter = get_adapter(MODELS[name]["model_type"])
    torch.manual_seed(0)
    model = adapter.build(next(iter(adapter.classes)), adapter.config_from_dict(dict(MODELS[name]))).cuda()
    if checkpointing:
        enable_grad_checkpointing(model)
    gen = torch.Generator().manual_seed(0)
    batches = [adapter.example_inputs(model, batch_size=batch, seq_len=text_tokens, generator=gen) for _ in range(steps)]
    torch.cuda.reset_peak_memory_stats()
    search(model, adapter.modules(model), adapter.native_loss, batches, upop.SearchConfig(steps=steps, update_every=1))
    peak = torch.cuda.max_memory_allocated() / GIB
    del model, batches
    torch.cuda.empty_cache()
    return peak


def fits(total: float) -> str:
    ok = [f"{g}" for g in GPUS_GB if total <= MARGIN * g * 1e9 / GIB]
    return ", ".join(ok) + " GB" if ok else "none (needs sharding)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32], help="examples per GPU")
    ap.add_argument("--text-tokens", type=int, default=64, help="text tokens per example (prompt + answer)")
    ap.add_argument("--measure", nargs="*", default=None, metavar="MODEL",
                    help="also run a few search steps of these models (default: the SmolVLMs) on this CUDA GPU and "
                         "print the peak memory beside the computed total")
    args = ap.parse_args()
    print(f"one image per example at the tower's size, {args.text_tokens} text tokens; GiB per GPU; fits: GPUs of "
          f"that many GB with {1 - MARGIN:.0%} left over\n")
    print("| model | params | units | batch | checkpointing | weights+grads+Adam | activations | logits | total | fits |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        s = shapes_of(name)
        for batch in args.batch:
            for ckpt in (False, True):
                parts = step_gib(s, batch, args.text_tokens, ckpt)
                total = sum(parts.values())
                print(f"| {name} | {s.params / 1e6:,.0f} M | {s.units:,} | {batch} | {'on' if ckpt else 'off'} | "
                      f"{parts['weights+grads+adam']:.1f} | {parts['activations']:.1f} | {parts['logits']:.1f} | "
                      f"{total:.1f} | {fits(total)} |")
    if args.measure is not None:
        measure(args.measure or [n for n in MODELS if n.startswith("SmolVLM")], args.batch, args.text_tokens)


def measure(names: list[str], batches: list[int], text_tokens: int) -> None:
    """The computed totals beside the peak a real search step reaches on this GPU."""
    if not torch.cuda.is_available():
        raise SystemExit("--measure needs a CUDA GPU")
    print(f"\nmeasured on {torch.cuda.get_device_name()} (peak allocated, GiB)\n")
    print("| model | batch | checkpointing | computed | measured |")
    print("|---|---|---|---|---|")
    for name in names:
        s = shapes_of(name)
        for batch in batches:
            for ckpt in (False, True):
                total = sum(step_gib(s, batch, text_tokens, ckpt).values())
                try:
                    got = f"{measured_gib(name, batch, text_tokens, ckpt):.1f}"
                except torch.cuda.OutOfMemoryError:
                    got, _ = "out of memory", torch.cuda.empty_cache()
                print(f"| {name} | {batch} | {'on' if ckpt else 'off'} | {total:.1f} | {got} |")


if __name__ == "__main__":
    main()
