"""BLIP's [ENC] token: the first text token of every encoder that reads the image (ITM, the VQA question
encoder), as BLIP trains them (``input_ids[:, 0] = enc_token_id``); its ITC text encoder reads [CLS].

BLIP's tokenizer is bert-base-uncased's 30,522 tokens, then [DEC] (30,522) and [ENC] (30,523); the text
embedding has those 30,524 rows. A tokenizer saved without [ENC] but ending at [DEC], with a text embedding one
row longer than the tokenizer, still holds [ENC]'s row: that row is taken as it."""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..training.distributed import current

__all__ = ["enc_token_id", "text_vocab_size", "with_enc", "say_once"]

_SAID: set[str] = set()


def say_once(line: str) -> None:
    """One line on stderr, once per process (rank 0 only: every rank would say the same)."""
    if line not in _SAID and current().rank == 0:
        _SAID.add(line)
        print(line, file=sys.stderr)


def text_vocab_size(model: Any) -> int | None:
    """Rows of the model's text embedding, from its config (None where it has no text config)."""
    size = getattr(getattr(getattr(model, "config", None), "text_config", None), "vocab_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def enc_token_id(tokenizer: Any, vocab_size: int | None = None) -> int | None:
    """The id of [ENC]: the tokenizer's own; else the row after a final [DEC] where the text embedding
    (``vocab_size`` rows) has exactly that one row more; else None."""
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab()
    if "[ENC]" in vocab:
        return int(vocab["[ENC]"])
    n = len(tokenizer)
    if vocab.get("[DEC]") == n - 1 and vocab_size == n + 1:
        return n
    return None


def with_enc(ids: torch.Tensor, enc: int | None, reader: str) -> torch.Tensor:
    """``ids`` with [ENC] as the first token; without an [ENC] id, the ids as they are ([CLS]), said once."""
    if enc is None:
        say_once(f"note: the tokenizer has no [ENC] token; BLIP's {reader} reads [CLS] as its first text token")
        return ids
    out = ids.clone()
    out[:, 0] = enc
    return out
