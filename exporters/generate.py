"""Greedy generation of a decoder VLM over its exported graphs (``upop.adapters.vlm_graphs``), in numpy.

The host does what the HF model does around its language model: the vision graph's features are written over
the embeddings at the image-token positions (row-major, as ``masked_scatter`` does), positions come from the
attention mask (``cumsum - 1``, as ``generate`` makes them for a left-padded batch), then one ``decoder_prefill``
and a ``decoder_step`` per new token, each feeding back the key/values it returned. Finished rows emit the pad
token, as ``generate`` pads them. The same tokens as ``generate(do_sample=False)`` (tested, LLaVA and Idefics3).
Works over any runtime's graphs (``runtime.GraphModel``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from upop.errors import GraphInputError

PREFIX_PAST, PREFIX_PRESENT = "past_", "present_"


@dataclass
class KvState:
    """What the next step needs: the mask over every position so far, the last position, and the cache."""

    mask: np.ndarray
    last_position: np.ndarray  # [B, 1]
    past: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])


class KvDecoder:
    """The four graphs of a decoder VLM export, driven from the host."""

    def __init__(self, graphs):
        self.graphs = graphs

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        (feats,) = self.graphs.run("vision_encoder", pixel_values=pixel_values.astype(np.float32))
        return feats

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        (emb,) = self.graphs.run("embed_tokens", input_ids=input_ids.astype(np.int64))
        return emb

    def prompt_embeds(self, input_ids: np.ndarray, features: np.ndarray | None, image_token_id: int | None) -> np.ndarray:
        """The prompt's embeddings with the image features at the image-token positions."""
        emb = self.embed(input_ids)
        slots = input_ids == image_token_id if image_token_id is not None else np.zeros(input_ids.shape, bool)
        rows = features.reshape(-1, emb.shape[-1]) if features is not None else emb[:0, 0]
        if int(slots.sum()) != len(rows):
            raise GraphInputError(f"the prompt has {int(slots.sum())} image tokens (id {image_token_id}) but the images "
                                  f"give {len(rows)} features: one image token per feature, as the processor writes them")
        emb[slots] = rows
        return emb

    def prefill(self, embeds: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, KvState]:
        mask = attention_mask.astype(np.int64)
        pos = np.where(mask == 0, 0, mask.cumsum(-1) - 1).astype(np.int64)
        outs = self.graphs.run("decoder_prefill", inputs_embeds=embeds.astype(np.float32), attention_mask=mask,
                               position_ids=pos)
        return self._next(outs, "decoder_prefill", KvState(mask, pos[:, -1:]))

    def step(self, embeds: np.ndarray, state: KvState) -> tuple[np.ndarray, KvState]:
        """One token [B, 1, H] after ``state``: its logits, and the state grown by one position."""
        mask = np.concatenate([state.mask, np.ones((state.mask.shape[0], 1), np.int64)], axis=1)
        check_step(embeds, mask, state.past)
        outs = self.graphs.run("decoder_step", inputs_embeds=embeds.astype(np.float32), attention_mask=mask,
                               position_ids=state.last_position + 1, **state.past)
        return self._next(outs, "decoder_step", KvState(mask, state.last_position + 1))

    def _next(self, outs: list[np.ndarray], graph: str, state: KvState) -> tuple[np.ndarray, KvState]:
        named = dict(zip(self.graphs.output_names(graph), outs))
        state.past = {PREFIX_PAST + n[len(PREFIX_PRESENT):]: v for n, v in named.items() if n.startswith(PREFIX_PRESENT)}
        return named["logits"][:, -1], state


def check_step(embeds: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray]) -> None:
    """A decode step's inputs agree: one new token per row, and every past key/value as long as the mask's past
    (a wrong cache would otherwise run, attending to the wrong positions, or fail deep in the runtime)."""
    if not past:
        raise GraphInputError("decoder_step needs the past key/values that decoder_prefill returned (none given)")
    if embeds.ndim != 3 or embeds.shape[1] != 1 or embeds.shape[0] != mask.shape[0]:
        raise GraphInputError(f"decoder_step takes one token's embeddings [batch, 1, hidden], got {list(embeds.shape)} "
                              f"for a batch of {mask.shape[0]}")
    want = mask.shape[1] - 1
    for name, value in past.items():
        if value.ndim != 4 or value.shape[0] != mask.shape[0] or value.shape[2] != want:
            raise GraphInputError(f"decoder_step: {name} has shape {list(value.shape)}, but the attention mask "
                                  f"covers {want} past positions for a batch of {mask.shape[0]} (past length must be "
                                  "the mask's length minus one)")


def flatten_images(pixel_values: np.ndarray, pixel_attention_mask: np.ndarray | None = None) -> np.ndarray:
    """The images a batch of prompts holds, in order, as the vision graph takes them [N, 3, S, S]: a processor's
    [B, images, 3, S, S] with its all-zero padding images dropped (as Idefics3 drops them). The graph encodes whole
    images (the processor's tiles with image splitting, its default): a pixel mask that pads inside a real image is
    refused rather than encoded wrong."""
    if pixel_values.ndim == 4:
        return pixel_values
    flat = pixel_values.reshape(-1, *pixel_values.shape[2:])
    real = (flat != 0).any(axis=(1, 2, 3))
    if pixel_attention_mask is not None and not pixel_attention_mask.reshape(len(flat), -1)[real].all():
        raise GraphInputError("the images are padded inside (pixel_attention_mask has zeros): the exported vision graph "
                              "encodes whole images; process them with image splitting (the processor's default)")
    return flat[real]


def greedy_generate(graphs, input_ids: np.ndarray, attention_mask: np.ndarray, *, eos: int | list[int] | None, pad: int,
                    max_new_tokens: int, pixel_values: np.ndarray | None = None,
                    image_token_id: int | None = None) -> np.ndarray:
    """[B, P + new] token ids, the prompt included, as ``generate(do_sample=False, max_new_tokens=...)`` returns
    them; a row ends at its first token in ``eos`` (one id or several) and is padded with ``pad`` after it.
    ``pixel_values``: the images whose features replace the prompt's image tokens, in order ([N, 3, S, S], or a
    processor's [B, images, 3, S, S], see ``flatten_images``)."""
    dec = KvDecoder(graphs)
    feats = dec.image_features(flatten_images(pixel_values)) if pixel_values is not None else None
    logits, state = dec.prefill(dec.prompt_embeds(input_ids, feats, image_token_id), attention_mask)
    ids = input_ids.astype(np.int64)
    done = np.zeros(len(ids), dtype=bool)
    for _ in range(max_new_tokens):
        nxt = np.where(done, pad, logits.argmax(-1)).astype(np.int64)
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
        done |= np.isin(nxt, [] if eos is None else eos)  # any of the end tokens, as generate stops on a list
        if done.all() or ids.shape[1] - input_ids.shape[1] >= max_new_tokens:
            break
        logits, state = dec.step(dec.embed(nxt[:, None]), state)
    return ids
