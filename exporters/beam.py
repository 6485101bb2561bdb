"""Beam search over an exported decoder, in numpy: the same tokens as transformers' ``generate(num_beams=K)``.

An exported captioner is evaluated as PyTorch evaluates it (``upop eval``), so its decoding must be
``generate``'s, not an approximation of it: this follows transformers' vectorised beam search (top 2·K
continuations of all beams, finished hypotheses scored by length-normalised log-probability, the
early-stop heuristic of ``early_stopping=False``), with ``min_length`` forbidding the end token as its
logits processor does. The decoder is reached through two callables, so any runtime's graphs can drive it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: the score transformers gives a beam that must not be chosen
_NEVER = -1.0e9


@dataclass(frozen=True)
class BeamSettings:
    num_beams: int
    max_length: int  # tokens in all, the prompt included
    min_length: int = 0
    length_penalty: float = 1.0
    early_stopping: bool = False


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, best first (ties: the lower index first)."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def _gather(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """x[b, idx[b, j], ...] for every row b."""
    return np.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(prefill: Callable[[np.ndarray], np.ndarray], step: Callable[[np.ndarray, np.ndarray, int], np.ndarray],
                prompt: np.ndarray, eos: int, pad: int, s: BeamSettings) -> np.ndarray:
    """[B, length] token ids, the prompt included.

    ``prefill(ids)``: ids [B·K, P] (each prompt repeated K times) → the last position's logits [B·K, V].
    ``step(tokens, rows, length)``: the decoder's cache must first be reordered to ``rows`` (for each new
    beam, the flat index of the beam it continues), then fed ``tokens`` [B·K] at total length ``length`` →
    logits [B·K, V]."""
    b, p = prompt.shape
    k, total = s.num_beams, s.max_length
    keep = 2 * k  # one end token: transformers keeps (1 + end tokens) · K continuations
    fill = pad if pad else eos  # what ``generate`` pads finished sequences with (``pad or eos``)
    running = np.full((b, k, total), fill, dtype=np.int64)
    running[:, :, :p] = prompt[:, None, :]
    seqs = running.copy()
    run_scores = np.zeros((b, k), dtype=np.float32)
    run_scores[:, 1:] = _NEVER
    scores = np.full((b, k), _NEVER, dtype=np.float32)
    finished = np.zeros((b, k), dtype=bool)
    hopeful = np.ones((b, 1), dtype=bool)  # the open beams may still beat the finished ones
    run_from = np.full((b, k, total - p), -1, dtype=np.int64)
    came_from = run_from.copy()
    top_k = np.arange(keep) < k
    cur = p
    logits = prefill(np.repeat(prompt, k, axis=0))
    while True:
        lp = _log_softmax(logits)
        if cur < s.min_length:
            lp[:, eos] = -np.inf
        vocab = lp.shape[-1]
        lp = (lp.reshape(b, k, vocab) + run_scores[:, :, None]).reshape(b, k * vocab)
        idx = _top(lp, keep)
        top_lp = np.take_along_axis(lp, idx, axis=1)
        beam, tok = idx // vocab, idx % vocab
        top_seq = _gather(running, beam).copy()
        top_seq[:, :, cur] = tok
        top_from = _gather(run_from, beam).copy()
        top_from[:, :, cur - p] = beam + np.arange(b)[:, None] * k
        hits = (tok == eos) | (cur + 1 >= total)
        # the open beams of the next step: the best K continuations that did not just end
        open_lp = (top_lp + hits.astype(np.float32) * _NEVER).astype(np.float32)
        nxt = _top(open_lp, k)
        running, run_scores, run_from = _gather(top_seq, nxt), _gather(open_lp, nxt), _gather(top_from, nxt)
        # finished hypotheses: among the top K only, length-normalised, while they can still enter
        ended = top_lp / np.float32((cur + 1 - p) ** s.length_penalty)
        full = finished.all(-1, keepdims=True) & (s.early_stopping is True)
        ended = ended + (full | ~hopeful | ~(hits & top_k[None, :])).astype(np.float32) * _NEVER
        merged = np.concatenate([scores, ended.astype(np.float32)], axis=1)
        best = _top(merged, k)
        seqs = _gather(np.concatenate([seqs, top_seq], axis=1), best)
        scores = np.take_along_axis(merged, best, axis=1)
        came_from = _gather(np.concatenate([came_from, top_from], axis=1), best)
        finished = np.take_along_axis(np.concatenate([finished, hits & top_k[None, :]], axis=1), best, axis=1)
        rows = run_from[:, :, cur - p].reshape(-1)
        cur += 1
        hopeful = hopeful & _could_improve(run_scores, scores, finished, cur - p, s)
        if not (hopeful.any() and not (finished.all() and s.early_stopping is True) and not hits.all()):
            break
        logits = step(running[:, :, cur - 1].reshape(-1), rows, cur)
    generated = int((came_from[:, 0, :] != -1).sum(1).max())
    return seqs[:, 0, : p + generated]


def _could_improve(run_scores: np.ndarray, scores: np.ndarray, finished: np.ndarray, length: int,
                   s: BeamSettings) -> np.ndarray:
    """transformers' heuristic for ``early_stopping=False``: the best open beam, normalised at the current
    length, against the worst finished hypothesis."""
    best_open = run_scores[:, :1] / np.float32(length ** s.length_penalty)
    worst = np.where(finished, scores.min(1, keepdims=True), np.float32(_NEVER))
    return (best_open > worst).any(-1, keepdims=True)
