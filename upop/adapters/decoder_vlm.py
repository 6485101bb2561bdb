"""What the decoder VLMs share (LLaVA, Idefics3/SmolVLM): a vision tower, a projector and a rotary decoder LM.

The units of both towers join one ranking: the vision tower's attention (heads or head dims) and MLPs as in CLIP
and SigLIP (``QKVOAdapter``), the language model's grouped-query attention and gated MLPs as the ``gqa`` and
``gated_mlp`` kinds describe them. The projector, the embeddings and the LM head are the interfaces between the
towers and the tokenizer: their widths stay. Tower names: ``vision`` and ``language`` (the projector is neither).
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import nn

from ..pruning.kinds import GatedMLPSpec, GQASpec
from ..pruning.units import ModuleSpec
from .base import QKVOAdapter, image_size_of, rand_ids, rand_pixels
from .factories import ModelFactory

#: the language models a decoder VLM of this package may carry (transformers' rotary GQA decoders)
LANGUAGE_MODELS = ("llama", "qwen2", "mistral")


def language_specs(model: nn.Module, stack: str, tower: str = "language") -> list[ModuleSpec]:
    """The GQA attention and gated MLP of every layer of a rotary decoder stack (its sizes read from the Linears,
    so a slim model describes its kept sizes)."""
    specs: list[ModuleSpec] = []
    for i, layer in enumerate(cast(nn.ModuleList, model.get_submodule(stack))):
        a, m, attn = f"{stack}.{i}.self_attn", f"{stack}.{i}.mlp", layer.self_attn
        hd = int(attn.head_dim)
        specs.append(GQASpec(name=a, tower=tower, q_proj=f"{a}.q_proj", k_proj=f"{a}.k_proj", v_proj=f"{a}.v_proj",
                             o_proj=f"{a}.o_proj", num_heads=attn.q_proj.out_features // hd,
                             num_kv_heads=attn.k_proj.out_features // hd, head_dim=hd))
        specs.append(GatedMLPSpec(name=m, tower=tower, gate=f"{m}.gate_proj", up=f"{m}.up_proj",
                                  down=f"{m}.down_proj", width=int(layer.mlp.up_proj.out_features)))
    return specs


class DecoderVLMAdapter(QKVOAdapter):
    """A decoder VLM: vision attention/MLP kinds under ``vision_stack``, GQA/gated-MLP kinds under ``language_stack``.

    ``towers`` maps dotted module-path prefixes to towers (the longest prefix wins), since every part of these
    models sits under one ``model`` attribute.
    """

    vision_stack: ClassVar[str]
    language_stack: ClassVar[str]
    #: none of their own: the chat tasks (``upop.tasks.chat``) name these families when they register
    tasks: ClassVar[dict[str, str]] = {}

    def tower_of(self, path: str) -> str:
        best = ""
        for prefix in self.towers:
            if (path == prefix or path.startswith(prefix + ".")) and len(prefix) > len(best):
                best = prefix
        return self.towers[best] if best else path.split(".", 1)[0]

    def modules(self, model: nn.Module) -> list[ModuleSpec]:
        # the vision stack's layers the LM reads only: a SigLIP pooling head (unused by the LM) is not a unit
        used, prefix = self.vision_layers_used(model), self.vision_stack + "."
        vision = [s for s in super().modules(model)
                  if s.name.startswith(prefix) and int(s.name[len(prefix):].split(".", 1)[0]) < used]
        return vision + language_specs(model, self.language_stack)

    def vision_layers_used(self, model: nn.Module) -> int:
        """How many of the vision stack's first layers reach the language model (all, unless a family says)."""
        return len(cast(nn.ModuleList, model.get_submodule(self.vision_stack)))

    # ---- tokens ------------------------------------------------------------------------------------
    def vision_tokens(self, model: nn.Module) -> int:
        """Tokens the vision tower's layers run on per image."""
        raise NotImplementedError

    def lm_image_tokens(self, model: nn.Module) -> int:
        """Image tokens the language model reads per image (after the projector)."""
        raise NotImplementedError

    def image_tokens(self, model: nn.Module) -> int:
        return self.vision_tokens(model)

    def module_tokens(self, model: nn.Module, spec: ModuleSpec, text_tokens: int) -> tuple[int, int]:
        if spec.tower == "vision":
            t = self.vision_tokens(model)
        else:
            t = self.lm_image_tokens(model) + text_tokens  # the LM runs over the image tokens and the text
        return t, t

    # ---- synthetic inputs -------------------------------------------------------------------------------
    def image_token_id(self, model: nn.Module) -> int:
        return int(model.config.image_token_id)

    def pixel_values(self, model: nn.Module, batch: int, gen: torch.Generator | None, dev: torch.device) -> torch.Tensor:
        return rand_pixels(batch, image_size_of(model.config.vision_config), gen, dev)

    def example_inputs(self, model: nn.Module, batch_size: int = 2, seq_len: int = 8,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One image per example: its image tokens, then ``seq_len`` random text tokens (never the image token)."""
        dev = next(model.parameters()).device
        image_id, vocab = self.image_token_id(model), int(model.config.text_config.vocab_size)
        text = rand_ids(batch_size, seq_len, vocab, generator, dev)
        text = torch.where(text == image_id, torch.ones_like(text), text)
        image = torch.full((batch_size, self.lm_image_tokens(model)), image_id, dtype=torch.long, device=dev)
        ids = torch.cat([image, text], dim=1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": self.pixel_values(model, batch_size, generator, dev)}

    def native_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token loss on the text tokens (the image tokens are inputs, never targets)."""
        labels = batch["input_ids"].masked_fill(batch["input_ids"] == self.image_token_id(model), -100)
        return model(**batch, labels=labels, use_cache=False).loss

    def forward_outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": model(**batch, use_cache=False).logits}


def language_config(text: str, *, hidden: int, layers: int, heads: int, vocab: int, intermediate: int,
                    **extra: Any) -> dict[str, Any]:
    """A rotary GQA decoder's config (``text``: one of ``LANGUAGE_MODELS``): two query heads per KV head, head dims
    of ``hidden // heads`` (even, so rotary pairs exist)."""
    if text not in LANGUAGE_MODELS:
        raise ValueError(f"language model {text!r}: one of {', '.join(LANGUAGE_MODELS)}")
    return dict(model_type=text, vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                head_dim=hidden // heads, max_position_embeddings=256, **extra)


class DecoderVLMModels(ModelFactory):
    """Configs of small decoder VLMs: the vision tower and the LM at one width (the projector maps between them)."""

    def vlm_config(self, *, vision: str, text: str, hidden: int, layers: int, heads: int, image_size: int,
                   patch_size: int, vocab: int, token_ids: dict[str, int]) -> Any:
        raise NotImplementedError

    def small_config(self, class_name: str, *, hidden: int, layers: int, heads: int, image_size: int,
                     patch_size: int, vocab: int, token_ids: dict[str, int], num_labels: int = 2) -> Any:
        """The demo's config; ``token_ids`` may name the ``image_token_id`` (default: the last id)."""
        return self.vlm_config(vision=self.default_vision, text="llama", hidden=hidden, layers=layers, heads=heads,
                               image_size=image_size, patch_size=patch_size, vocab=vocab, token_ids=token_ids)

    def random_config(self, class_name: str, hidden: int = 32, layers: int = 2, heads: int = 4,
                      image_size: int = 32, patch_size: int = 8, vocab: int = 99, vision: str | None = None,
                      text: str = "llama") -> Any:
        """A tiny config; ``vision`` (the family's towers) and ``text`` (``LANGUAGE_MODELS``) pick the towers."""
        ids = {"pad_token_id": 0, "bos_token_id": vocab - 3, "eos_token_id": vocab - 2, "image_token_id": vocab - 1}
        return self.vlm_config(vision=vision or self.default_vision, text=text, hidden=hidden, layers=layers,
                               heads=heads, image_size=image_size, patch_size=patch_size, vocab=vocab, token_ids=ids)

    default_vision: ClassVar[str]
