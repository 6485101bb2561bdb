"""benchmarks/vlm_memory.py's activation counts are what PyTorch saves for the backward in a vision layer and a
decoder layer of a decoder VLM, masks attached, under bf16 autocast with flash attention (CPU has both)."""

import pytest
import torch

from benchmarks.vlm_memory import MODELS, language_layer_bytes, shapes_of, step_gib, vision_layer_bytes
from upop.adapters import get_adapter
from upop.pruning.masks import MaskSet

from ..conftest import build_tiny

TOKENS = (3, 16)  # batch, sequence: their product (48) differs from every width, so no cast passes for a weight


def _saved_bytes_per_token(model, layer, x, **kwargs) -> float:
    """Bytes of the distinct storages a layer's forward saves for the backward, per token: not the parameters, not
    autocast's bf16 weight copies (counted with the weights) and not what came from outside the layer."""
    outside = {p.data_ptr() for p in model.parameters()} | {t.data_ptr() for t in kwargs.get("position_embeddings", ())}
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in outside and type(t.grad_fn).__name__ != "TBackward0":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, **kwargs)
    return sum(seen.values()) / (TOKENS[0] * TOKENS[1])


def _vlm():
    adapter = get_adapter("llava")
    model = build_tiny("llava", "LlavaForConditionalGeneration", vision="siglip", text="qwen2").train()
    model.set_attn_implementation("sdpa")
    MaskSet(model, adapter.modules(model), "dim")
    return model


def test_a_vision_layer_saves_what_the_formula_counts():
    model = _vlm()
    cfg = model.config.vision_config
    x = torch.randn(*TOKENS, cfg.hidden_size, requires_grad=True)
    measured = _saved_bytes_per_token(model, model.model.vision_tower.encoder.layers[0], x, attention_mask=None)
    assert measured == pytest.approx(vision_layer_bytes(cfg.hidden_size, cfg.intermediate_size), rel=0.05)


def test_a_decoder_layer_saves_what_the_formula_counts():
    model = _vlm()
    lm, cfg = model.model.language_model, model.config.text_config
    x = torch.randn(*TOKENS, cfg.hidden_size, requires_grad=True)
    pos = torch.arange(TOKENS[1])[None].expand(TOKENS[0], -1)
    cos_sin = lm.rotary_emb(x, pos)
    measured = _saved_bytes_per_token(model, lm.layers[0], x, attention_mask=None, position_embeddings=cos_sin,
                                      position_ids=pos)
    want = language_layer_bytes(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                                 cfg.num_key_value_heads, cfg.head_dim)
    assert measured == pytest.approx(want, rel=0.05)


def test_the_published_shapes_give_the_published_sizes_and_checkpointing_saves_memory():
    """The config shapes written in the benchmark build models of the sizes their names say."""
    sizes = {name: shapes_of(name).params for name in MODELS}
    assert sizes["SmolVLM-256M"] == pytest.approx(256e6, rel=0.02)
    assert sizes["SmolVLM-500M"] == pytest.approx(507e6, rel=0.02)
    assert sizes["SmolVLM-2B"] == pytest.approx(2.25e9, rel=0.02)
    assert sizes["LLaVA-1.5-7B"] == pytest.approx(7.06e9, rel=0.01)
    s = shapes_of("SmolVLM-256M")
    off, on = step_gib(s, 8, 64, False), step_gib(s, 8, 64, True)
    assert on["activations"] < off["activations"] / 4 and on["weights+grads+adam"] == off["weights+grads+adam"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_a_search_step_on_a_gpu_stays_within_the_computed_memory():
    """SmolVLM-256M's shapes (random weights), batch 8, AMP, with and without checkpointing: the peak the search
    reaches is not above the computed total by more than the 10% margin the table leaves."""
    from benchmarks.vlm_memory import measured_gib

    s = shapes_of("SmolVLM-256M")
    for ckpt in (False, True):
        assert measured_gib("SmolVLM-256M", 8, 64, ckpt) <= 1.1 * sum(step_gib(s, 8, 64, ckpt).values())
