"""Weights of the original BLIP NLVR2 checkpoint (``model_base_nlvr.pth``) into
``BlipNlvrForVisualReasoning``.

The file is a torch pickle: it is read with ``weights_only=True`` (tensors and plain containers
only, never code). Every key is mapped; a key that maps to nothing, or a weight of the model that
no key fills, is an error naming them, so a checkpoint of another layout fails loudly instead of
loading half its weights.
"""

from __future__ import annotations

import re
from pathlib import Path
import torch

from ..errors import CheckpointError, ConfigError
from ..run.safety import load_tensors
from .blip_nlvr import BlipNlvrConfig, BlipNlvrForVisualReasoning

#: BLIP's tokenizer adds [DEC] then [ENC] after bert-base-uncased's 30522 tokens.
ORIGINAL_ENC_TOKEN_ID = 30523

_VISION = [
    (r"visual_encoder\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"visual_encoder\.pos_embed", "vision_model.embeddings.position_embedding"),
    (r"visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
    (r"visual_encoder\.blocks\.(\d+)\.norm1\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm1.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.norm2\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm2.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"vision_model.encoder.layers.\1.self_attn.qkv.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)",
     r"vision_model.encoder.layers.\1.self_attn.projection.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.\2.\3"),
    (r"visual_encoder\.norm\.(weight|bias)", r"vision_model.post_layernorm.\1"),
]
_TEXT = [
    (r"text_encoder\.embeddings\.(word_embeddings|position_embeddings|LayerNorm)\.(weight|bias)",
     r"text_encoder.embeddings.\1.\2"),
    (r"text_encoder\.encoder\.layer\.(\d+)\.(attention\.self\.(?:query|key|value)"
     r"|attention\.output\.(?:dense|LayerNorm)"
     r"|crossattention\.self[01]\.(?:query|key|value)"
     r"|crossattention\.output\.(?:dense0|dense1|merge_layer|LayerNorm)"
     r"|intermediate\.dense|output\.dense|output\.LayerNorm)\.(weight|bias)",
     r"text_encoder.encoder.layer.\1.\2.\3"),
    (r"cls_head\.(0|2)\.(weight|bias)", r"cls_head.\1.\2"),
]
#: keys that hold no weight (buffers recomputed at load)
_IGNORED = re.compile(r"text_encoder\.embeddings\.position_ids")


def map_key(key: str) -> str | None:
    for pattern, target in _VISION + _TEXT:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(target)
    return None


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    data = load_tensors(p, CheckpointError, "a readable torch checkpoint (read with weights_only=True)")
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{p} holds no state dict (expected tensors by name, or {{'model': state dict}})")
    return state


def config_from_state(state: dict[str, torch.Tensor], head_dim: int = 64,
                      enc_token_id: int | None = ORIGINAL_ENC_TOKEN_ID) -> BlipNlvrConfig:
    """The model's sizes, read from the weights' shapes (heads: width / ``head_dim``, BLIP's 64)."""
    for name, key, axis in (("vision", "visual_encoder.pos_embed", -1),
                            ("text", "text_encoder.embeddings.word_embeddings.weight", 1)):
        if key in state and int(state[key].shape[axis]) % head_dim:
            raise ConfigError(f"--head-dim {head_dim} does not divide the {name} width {int(state[key].shape[axis])}")
    try:
        pos = state["visual_encoder.pos_embed"]
        patch = state["visual_encoder.patch_embed.proj.weight"]
        words = state["text_encoder.embeddings.word_embeddings.weight"]
        positions = state["text_encoder.embeddings.position_embeddings.weight"]
        v_ffn = state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]
        t_ffn = state["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"not a BLIP NLVR2 checkpoint: it has no {exc.args[0]}") from None
    v_hidden, t_hidden = int(pos.shape[-1]), int(words.shape[1])
    p = int(patch.shape[-1])
    grid = round((pos.shape[1] - 1) ** 0.5)
    v_layers = len({k.split(".")[2] for k in state if k.startswith("visual_encoder.blocks.")})
    t_layers = len({k.split(".")[3] for k in state if k.startswith("text_encoder.encoder.layer.")})
    return BlipNlvrConfig(
        enc_token_id=enc_token_id,
        vision_config=dict(hidden_size=v_hidden, intermediate_size=int(v_ffn), num_hidden_layers=v_layers,
                           num_attention_heads=v_hidden // head_dim, image_size=grid * p, patch_size=p,
                           layer_norm_eps=1e-6),
        text_config=dict(vocab_size=int(words.shape[0]), hidden_size=t_hidden, intermediate_size=int(t_ffn),
                         num_hidden_layers=t_layers, num_attention_heads=t_hidden // head_dim,
                         max_position_embeddings=int(positions.shape[0]), encoder_hidden_size=v_hidden),
        image_text_hidden_size=256)


def convert_nlvr_checkpoint(path: str | Path, head_dim: int = 64,
                            enc_token_id: int | None = ORIGINAL_ENC_TOKEN_ID) -> BlipNlvrForVisualReasoning:
    state = read_checkpoint(path)
    config = config_from_state(state, head_dim, enc_token_id)
    if enc_token_id is not None and not 0 <= enc_token_id < config.text_config.vocab_size:
        raise CheckpointError(f"the [ENC] token id {enc_token_id} is outside the checkpoint's vocabulary of "
                              f"{config.text_config.vocab_size}; pass the id its tokenizer gives [ENC]")
    model = BlipNlvrForVisualReasoning(config)
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state.items():
        if _IGNORED.fullmatch(key):
            continue
        target = map_key(key)
        if target is None or target not in own:
            unmapped.append(key)
            continue
        if tuple(own[target].shape) != tuple(value.shape):
            raise CheckpointError(f"{key}: shape {list(value.shape)} does not fit {target} {list(own[target].shape)}")
        mapped[target] = value
    if unmapped:
        raise CheckpointError(f"{len(unmapped)} key(s) of {path} map to no weight: {', '.join(unmapped[:8])}")
    missing = [k for k in own if k not in mapped and not k.endswith("position_ids")]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} weight(s) of the model: {', '.join(missing[:8])}")
    model.load_state_dict(mapped, strict=False)
    return model.eval()
