"""Tiny transformers decoder stacks (Llama, Qwen2) with random weights, described as unit kinds."""

from __future__ import annotations

import torch
from torch import nn

from upop.pruning.kinds import GatedMLPSpec, GQASpec, patch_rotary_attention

DECODERS = ["llama", "qwen2"]  # Qwen2's q/k/v carry biases: the fold covers them


def tiny_decoder(model_type: str, seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=8, max_position_embeddings=64, attn_implementation="eager")
    return transformers.AutoModel.from_config(cfg).eval()


def decoder_specs(model: nn.Module) -> list:
    specs: list = []
    for i, layer in enumerate(model.layers):
        a, m = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        specs.append(GQASpec(name=a, tower="text", q_proj=f"{a}.q_proj", k_proj=f"{a}.k_proj", v_proj=f"{a}.v_proj",
                             o_proj=f"{a}.o_proj", num_heads=layer.self_attn.q_proj.out_features // layer.self_attn.head_dim,
                             num_kv_heads=layer.self_attn.k_proj.out_features // layer.self_attn.head_dim,
                             head_dim=layer.self_attn.head_dim))
        specs.append(GatedMLPSpec(name=m, tower="text", gate=f"{m}.gate_proj", up=f"{m}.up_proj", down=f"{m}.down_proj",
                                  width=layer.mlp.up_proj.out_features))
    return specs


class Patcher:
    """The size patches of transformers' rotary decoders (what ``Adapter`` does by default)."""

    def patch_mlp(self, model, spec, width):
        pass

    def patch_gqa(self, model, spec, kept, granularity):
        patch_rotary_attention(model, spec, kept, granularity)


def ids(batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(1))
