"""BLIP for visual reasoning over an image pair (NLVR2), in the ``transformers`` style.

The design is BLIP's own: one vision encoder applied to both images; a text encoder whose layers
carry twin cross-attention, one branch per image; the branches' outputs go through their own
output projections and are averaged in the lower half of the layers, concatenated and merged by
a linear layer in the upper half; a two-way head (Linear, ReLU, Linear) on the first token.

Module names follow BLIP's checkpoint (``crossattention.self0/self1``, ``output.dense0/dense1/
merge_layer``) so the converter maps names one to one; the pieces are the ``transformers`` BLIP
text modules, so the BLIP adapter's slimming applies to every branch unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoProcessor, BlipConfig, BlipProcessor
from transformers.modeling_outputs import ModelOutput
from transformers.models.blip.modeling_blip import BlipPreTrainedModel, BlipVisionModel
from transformers.models.blip.modeling_blip_text import (
    BlipTextAttention,
    BlipTextEmbeddings,
    BlipTextIntermediate,
    BlipTextOutput,
    BlipTextSelfAttention,
)


class BlipNlvrConfig(BlipConfig):
    """A BLIP config plus ``enc_token_id``: when set, the first text token is replaced by it (BLIP's
    checkpoints were trained with an [ENC] token there; models fine-tuned here keep [CLS])."""

    model_type = "blip_nlvr"

    def __init__(self, enc_token_id: int | None = None, **kwargs):
        kwargs.setdefault("num_labels", 2)
        super().__init__(**kwargs)
        self.enc_token_id = enc_token_id


@dataclass
class VisualReasoningOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[batch, keys] 0/1 mask -> [batch, 1, 1, keys] additive scores mask."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class BlipNlvrTwinOutput(nn.Module):
    """Each branch's output projection, then their mean (lower layers) or a merge layer (upper)."""

    def __init__(self, config, merge: bool):
        super().__init__()
        h = config.hidden_size
        self.dense0 = nn.Linear(h, h)
        self.dense1 = nn.Linear(h, h)
        self.merge_layer = nn.Linear(2 * h, h) if merge else None
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, ctx0: torch.Tensor, ctx1: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h0, h1 = self.dense0(ctx0), self.dense1(ctx1)
        h = self.merge_layer(torch.cat([h0, h1], dim=-1)) if self.merge_layer is not None else (h0 + h1) / 2
        return self.LayerNorm(self.dropout(h) + residual)


class BlipNlvrTwinCrossAttention(nn.Module):
    def __init__(self, config, merge: bool):
        super().__init__()
        self.self0 = BlipTextSelfAttention(config, is_cross_attention=True)
        self.self1 = BlipTextSelfAttention(config, is_cross_attention=True)
        self.output = BlipNlvrTwinOutput(config, merge)

    def forward(self, hidden: torch.Tensor, images: tuple[torch.Tensor, torch.Tensor],
                image_masks: tuple[torch.Tensor | None, torch.Tensor | None]) -> torch.Tensor:
        c0 = self.self0(hidden, encoder_hidden_states=images[0], encoder_attention_mask=image_masks[0])[0]
        c1 = self.self1(hidden, encoder_hidden_states=images[1], encoder_attention_mask=image_masks[1])[0]
        return self.output(c0, c1, hidden)


class BlipNlvrTextLayer(nn.Module):
    def __init__(self, config, layer_num: int):
        super().__init__()
        self.attention = BlipTextAttention(config)
        self.crossattention = BlipNlvrTwinCrossAttention(config, merge=layer_num >= config.num_hidden_layers // 2)
        self.intermediate = BlipTextIntermediate(config)
        self.output = BlipTextOutput(config)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, images, image_masks) -> torch.Tensor:
        hidden = self.attention(hidden, attention_mask=mask)[0]
        hidden = self.crossattention(hidden, images, image_masks)
        return self.output(self.intermediate(hidden), hidden)


class _Layers(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList([BlipNlvrTextLayer(config, i) for i in range(config.num_hidden_layers)])


class BlipNlvrTextEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embeddings = BlipTextEmbeddings(config)
        self.encoder = _Layers(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                images: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # Explicit positions: the embeddings' position_ids buffer is not saved, and from_pretrained
        # leaves it uninitialised inside a module it did not build itself.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        hidden = self.embeddings(input_ids=input_ids, position_ids=positions)
        mask = _additive(attention_mask, hidden.dtype)
        image_masks = (None, None)  # every image token is real: nothing to mask
        for layer in self.encoder.layer:
            hidden = layer(hidden, mask, images, image_masks)
        return hidden


class BlipNlvrForVisualReasoning(BlipPreTrainedModel):
    """Is the statement true of the image pair? ``pixel_values`` is [batch, 2, 3, H, W]."""

    config_class = BlipNlvrConfig
    main_input_name = "pixel_values"
    _no_split_modules = ["BlipEncoderLayer", "BlipNlvrTextLayer"]

    def __init__(self, config: BlipNlvrConfig):
        super().__init__(config)
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipNlvrTextEncoder(config.text_config)
        h = config.text_config.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, config.num_labels))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_encoder.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_encoder.embeddings.word_embeddings = value

    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both images through the one vision encoder, in a single batch."""
        b = pixel_values.shape[0]
        seq = self.vision_model(pixel_values=pixel_values.flatten(0, 1)).last_hidden_state
        seq = seq.view(b, 2, *seq.shape[1:])
        return seq[:, 0], seq[:, 1]

    def reason(self, image0: torch.Tensor, image1: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits from the two images' token sequences and the statement."""
        if self.config.enc_token_id is not None:
            input_ids = input_ids.clone()
            input_ids[:, 0] = self.config.enc_token_id
        hidden = self.text_encoder(input_ids, attention_mask, (image0, image1))
        return self.cls_head(hidden[:, 0])

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> VisualReasoningOutput:
        if pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
            raise ValueError(f"pixel_values must be [batch, 2, 3, H, W] (an image pair), not {list(pixel_values.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image0, image1 = self.encode_images(pixel_values)
        logits = self.reason(image0, image1, input_ids, attention_mask)
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return VisualReasoningOutput(loss=loss, logits=logits)

    @classmethod
    def from_retrieval(cls, retrieval: nn.Module, enc_token_id: int | None = None) -> "BlipNlvrForVisualReasoning":
        """A model initialised from an HF ``BlipForImageTextRetrieval``: vision encoder, embeddings,
        self-attention and MLPs copied; both cross-attention branches start from its cross-attention
        (and both output projections from its one); the merge layers start as the mean of the two
        branches, so every layer first computes what the lower layers do. The head starts random."""
        cfg = retrieval.config.to_dict()
        for k in ("model_type", "architectures", "transformers_version"):
            cfg.pop(k, None)
        config = BlipNlvrConfig(enc_token_id=enc_token_id, **cfg)
        config.num_labels = 2
        model = cls(config)
        src = retrieval.state_dict()
        mapped = {}
        for key, value in src.items():
            if key.startswith("vision_model."):
                mapped[key] = value
            elif key.startswith("text_encoder.embeddings."):
                mapped[key] = value
            elif key.startswith("text_encoder.encoder.layer."):
                if ".crossattention.self." in key:
                    for b in ("0", "1"):
                        mapped[key.replace(".crossattention.self.", f".crossattention.self{b}.")] = value
                elif ".crossattention.output.dense." in key:
                    for b in ("0", "1"):
                        mapped[key.replace(".output.dense.", f".output.dense{b}.")] = value
                else:
                    mapped[key] = value
        with torch.no_grad():
            for i, layer in enumerate(model.text_encoder.encoder.layer):
                merge = layer.crossattention.output.merge_layer
                if merge is not None:
                    h = merge.out_features
                    eye = torch.eye(h) / 2
                    mapped[f"text_encoder.encoder.layer.{i}.crossattention.output.merge_layer.weight"] = torch.cat([eye, eye], 1)
                    mapped[f"text_encoder.encoder.layer.{i}.crossattention.output.merge_layer.bias"] = torch.zeros(h)
        own = model.state_dict()
        mapped = {k: v for k, v in mapped.items() if k in own}
        missing = [k for k in own if k not in mapped and not k.startswith("cls_head.")
                   and not k.endswith("position_ids")]
        if missing:
            raise ValueError(f"the retrieval model lacks {len(missing)} weights the reasoning model needs: "
                             f"{', '.join(missing[:5])}")
        model.load_state_dict(mapped, strict=False)
        return model


AutoConfig.register(BlipNlvrConfig.model_type, BlipNlvrConfig, exist_ok=True)
AutoModel.register(BlipNlvrConfig, BlipNlvrForVisualReasoning, exist_ok=True)
# BLIP's processor (its tokenizer + image processor) serves the reasoning model as it is.
AutoProcessor.register(BlipNlvrConfig, BlipProcessor, exist_ok=True)
