"""BLIP's [ENC] token: the first text token of every encoder that reads the image (ITM, the VQA question
encoder), as BLIP trains them (``input_ids[:, 0] = enc_token_id``); its ITC text encoder reads [CLS].

BLIP's tokenizer is bert-base-uncased's 30,522 tokens, then [DEC] (30,522) and [ENC] (30,523); the text
embedding has those 30,524 rows. transformers' converted BLIP checkpoints keep the 30,524 rows (the config's
``bos_token_id`` is [DEC]'s 30,522) but ship bert-base-uncased's tokenizer, without [DEC] or [ENC]: where the
embedding has exactly the two rows after the tokenizer's that BLIP adds, the second is [ENC]'s."""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..training.distributed import current

__all__ = ["enc_row", "enc_token_id", "text_embedding", "text_ids", "with_enc", "say_once"]

_SAID: set[str] = set()


def say_once(line: str) -> None:
    """One line on stderr, once per process (rank 0 only: every rank would say the same)."""
    if line not in _SAID and current().rank == 0:
        _SAID.add(line)
        print(line, file=sys.stderr)


#: the text config's token ids that are not [ENC] (a row one of them names is taken)
_OTHER_IDS = ("sep_token_id", "eos_token_id", "pad_token_id")


def text_embedding(model: Any) -> tuple[int | None, int | None, tuple[int, ...]]:
    """(rows of the model's text embedding, its [DEC] id: the text config's ``bos_token_id``, its other special
    ids), None / () where absent."""
    return text_ids(getattr(getattr(model, "config", None), "text_config", None))


def text_ids(text: Any) -> tuple[int | None, int | None, tuple[int, ...]]:
    """``text_embedding`` of a text config itself (an export's, read from its ``export.json``)."""

    def whole(v: Any) -> int | None:
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    others = tuple(v for v in (whole(getattr(text, k, None)) for k in _OTHER_IDS) if v is not None)
    return whole(getattr(text, "vocab_size", None)), whole(getattr(text, "bos_token_id", None)), others


def enc_token_id(tokenizer: Any, vocab_size: int | None = None, dec_id: int | None = None,
                 taken: tuple[int, ...] = ()) -> int | None:
    """The id of [ENC]: the tokenizer's own (if the embedding has its row); else ``dec_id`` + 1 where the embedding
    ends right after it (``vocab_size`` = ``dec_id`` + 2), the tokenizer stops at or before [DEC] and no other
    special token (``taken``) names that row; else None."""
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab()
    if "[ENC]" in vocab:
        own = int(vocab["[ENC]"])
        return own if vocab_size is None or own < vocab_size else None
    row = enc_row(vocab_size, dec_id, taken)
    return row if row is not None and len(tokenizer) <= row else None  # the tokenizer stops at or before [DEC]


def enc_row(vocab_size: int | None, dec_id: int | None, taken: tuple[int, ...] = ()) -> int | None:
    """The config's part of the rule: the row after [DEC] where the embedding ends right after it and no other
    special token names it (a model without its tokenizer: ``init_from``)."""
    if dec_id is not None and vocab_size == dec_id + 2 and dec_id + 1 not in taken:
        return dec_id + 1
    return None


def with_enc(ids: torch.Tensor, enc: int | None, reader: str) -> torch.Tensor:
    """``ids`` with [ENC] as the first token; without an [ENC] id, the ids as they are ([CLS]), said once."""
    if enc is None:
        say_once(f"note: the tokenizer has no [ENC] token; BLIP's {reader} reads [CLS] as its first text token")
        return ids
    out = ids.clone()
    out[:, 0] = enc
    return out
