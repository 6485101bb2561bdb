"""The BLIP NLVR2 model: HF-style save/load, initialisation from a BLIP retrieval folder, and the
converter from the original checkpoint layout."""

from __future__ import annotations

import pickle

import pytest
import torch
import transformers

from upop.adapters import get_adapter
from upop.errors import CheckpointError
from upop.models.hub import load_pretrained
from upop.models import BlipNlvrConfig, BlipNlvrForVisualReasoning
from upop.models.convert import convert_nlvr_checkpoint, map_key

from ...conftest import build_tiny, randomize_

HEAD_DIM = 16


def _same_width_model() -> BlipNlvrForVisualReasoning:
    """Both towers 32 wide in heads of 16 (the converter infers heads from one head width, as BLIP's 64)."""
    adapter = get_adapter("blip_nlvr")
    cfg = adapter.small_config("BlipNlvrForVisualReasoning", hidden=32, layers=2, heads=2, image_size=32,
                               patch_size=8, vocab=60, token_ids={"pad_token_id": 0})
    torch.manual_seed(0)
    return randomize_(BlipNlvrForVisualReasoning(cfg)).eval()


def _original_layout(model: BlipNlvrForVisualReasoning) -> dict[str, torch.Tensor]:
    """The model's weights under BLIP's own names (models/blip_nlvr.py + vit.py + nlvr_encoder.py)."""
    out = {}
    for key, value in model.state_dict().items():
        k = key
        if k.startswith("vision_model."):
            k = (k.replace("vision_model.embeddings.class_embedding", "visual_encoder.cls_token")
                 .replace("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed")
                 .replace("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj")
                 .replace("vision_model.post_layernorm", "visual_encoder.norm")
                 .replace("vision_model.encoder.layers", "visual_encoder.blocks")
                 .replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")
                 .replace("self_attn.projection", "attn.proj").replace("self_attn.qkv", "attn.qkv"))
        out[k] = value.clone()
    out["text_encoder.embeddings.position_ids"] = torch.arange(64)[None]  # a buffer BLIP's files carry
    return out


def _write(tmp_path, state, name="model_base_nlvr.pth"):
    path = tmp_path / name
    torch.save({"model": state, "epoch": 9}, path)
    return path


def test_converter_maps_every_original_key_with_nothing_left_over(tmp_path):
    src = _same_width_model()
    state = _original_layout(src)
    assert any(k.startswith("visual_encoder.blocks.1.attn.qkv") for k in state)
    assert "text_encoder.encoder.layer.1.crossattention.output.merge_layer.weight" in state
    assert "text_encoder.encoder.layer.0.crossattention.output.merge_layer.weight" not in state  # lower half averages
    model = convert_nlvr_checkpoint(_write(tmp_path, state), head_dim=HEAD_DIM, enc_token_id=None)
    mine, theirs = model.state_dict(), src.state_dict()
    assert set(mine) == set(theirs)
    for k, v in theirs.items():
        if not k.endswith("position_ids"):
            assert torch.equal(mine[k], v), k
    cv, sv = model.config.vision_config, src.config.vision_config
    assert (cv.hidden_size, cv.num_hidden_layers, cv.num_attention_heads, cv.image_size, cv.patch_size) == \
           (sv.hidden_size, sv.num_hidden_layers, sv.num_attention_heads, sv.image_size, sv.patch_size)
    assert model.config.text_config.encoder_hidden_size == sv.hidden_size


def test_every_original_key_of_a_real_layout_has_a_target():
    names = ["visual_encoder.cls_token", "visual_encoder.pos_embed", "visual_encoder.patch_embed.proj.weight",
             "visual_encoder.blocks.11.attn.qkv.bias", "visual_encoder.blocks.0.mlp.fc2.weight",
             "visual_encoder.norm.bias", "text_encoder.embeddings.word_embeddings.weight",
             "text_encoder.encoder.layer.7.crossattention.self1.value.weight",
             "text_encoder.encoder.layer.7.crossattention.output.merge_layer.bias",
             "text_encoder.encoder.layer.2.crossattention.output.dense0.weight",
             "text_encoder.encoder.layer.2.attention.output.LayerNorm.weight", "cls_head.2.bias"]
    for n in names:
        assert map_key(n) is not None, n
    assert map_key("text_encoder.pooler.dense.weight") is None


def test_converter_reports_unmapped_and_missing_keys(tmp_path):
    state = _original_layout(_same_width_model())
    extra = dict(state, **{"text_encoder.pooler.dense.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="map to no weight: text_encoder.pooler.dense.weight"):
        convert_nlvr_checkpoint(_write(tmp_path, extra), head_dim=HEAD_DIM, enc_token_id=None)
    missing = {k: v for k, v in state.items() if not k.startswith("cls_head.2")}
    with pytest.raises(CheckpointError, match="lacks 2 weight.*cls_head.2"):
        convert_nlvr_checkpoint(_write(tmp_path, missing), head_dim=HEAD_DIM, enc_token_id=None)
    wrong = dict(state, **{"cls_head.0.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="shape"):
        convert_nlvr_checkpoint(_write(tmp_path, wrong), head_dim=HEAD_DIM, enc_token_id=None)


class _Code:
    def __reduce__(self):
        return (print, ("this would run on load",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the hostile file is a plain pickle on purpose
def test_converter_reads_weights_only(tmp_path):
    bad = tmp_path / "code.pth"
    with bad.open("wb") as f:
        pickle.dump({"model": _Code()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        convert_nlvr_checkpoint(bad)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        convert_nlvr_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_nlvr_checkpoint(tmp_path / "nothing.pth")
    torch.save({"model": {"a.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a BLIP NLVR2 checkpoint"):
        convert_nlvr_checkpoint(tmp_path / "other.pth")


def test_built_from_an_hf_retrieval_folder_runs_and_starts_as_the_retrieval_model(tmp_path):
    retrieval = build_tiny("blip", "BlipForImageTextRetrieval")
    retrieval.save_pretrained(tmp_path / "itm")
    loaded = load_pretrained(str(tmp_path / "itm")).model.eval()
    model = get_adapter("blip_nlvr").init_from(loaded).eval()
    g = torch.Generator().manual_seed(1)
    size = loaded.config.vision_config.image_size
    px = torch.randn(3, 3, size, size, generator=g)
    ids = torch.randint(1, 90, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        seq = loaded.vision_model(pixel_values=px).last_hidden_state
        a, b = model.encode_images(torch.stack([px, px], 1))
        assert torch.allclose(a, seq, atol=1e-6) and torch.allclose(b, seq, atol=1e-6)
        # the same image on both sides: every layer computes exactly the retrieval model's ITM encoder
        ours = model.text_encoder(ids, mask, (seq, seq))
        ref = loaded.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=seq).last_hidden_state
        assert torch.allclose(ours, ref, atol=1e-5)
        out = model(pixel_values=torch.stack([px, px.flip(0)], 1), input_ids=ids, attention_mask=mask,
                    labels=torch.tensor([0, 1, 1]))
    assert out.logits.shape == (3, 2) and torch.isfinite(out.loss)


def test_save_and_load_like_any_hf_model(tmp_path):
    model = build_tiny("blip_nlvr", "BlipNlvrForVisualReasoning")
    model.config.architectures = ["BlipNlvrForVisualReasoning"]
    model.save_pretrained(tmp_path / "m")
    assert isinstance(transformers.AutoConfig.from_pretrained(tmp_path / "m"), BlipNlvrConfig)
    again = load_pretrained(str(tmp_path / "m")).model.eval()
    assert type(again) is BlipNlvrForVisualReasoning
    batch = get_adapter("blip_nlvr").example_inputs(model, batch_size=2)
    with torch.no_grad():
        assert torch.allclose(again(**batch).logits, model(**batch).logits, atol=1e-6)
    with pytest.raises(ValueError, match="image pair"):
        model(pixel_values=batch["pixel_values"][:, 0], input_ids=batch["input_ids"])
