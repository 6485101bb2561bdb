"""Task metrics, written out so their definitions are visible and testable.

- Recall@K for image↔text retrieval (an image can have several captions).
- BLEU-4 (corpus level, closest reference length for the brevity penalty, as coco-caption).
- CIDEr-D (coco-caption: n-grams 1-4, tf-idf with document frequencies over the references of
  the evaluated set, candidate counts clipped by reference counts, Gaussian length penalty
  σ = 6, scaled by 10).
- VQA accuracy: min(#annotators who gave the answer / 3, 1), answers normalised as VQAv2's evaluation does.
- Top-k classification accuracy.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch

_PUNCT = re.compile(r"[^\w\s]")


def tokenize(text: str) -> list[str]:
    return _PUNCT.sub(" ", text.lower()).split()


def recall_at_k(sim: torch.Tensor, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10),
                sim_t2i: torch.Tensor | None = None) -> dict[str, float]:
    """``sim`` is [images, texts]; ``text_to_image[j]`` is the image of text j. Percentages.

    ``sim_t2i`` ([texts, images]) ranks the text→image direction when it is scored differently
    (BLIP re-ranks each direction's top-k by ITM); by default it is ``sim`` transposed.
    """
    n_img, n_txt = sim.shape
    t2i_target = torch.as_tensor(list(text_to_image))
    # image → text: rank of the best-ranked correct caption
    order = torch.argsort(sim, dim=1, descending=True)
    correct = t2i_target[order] == torch.arange(n_img)[:, None]
    i2t_rank = correct.float().argmax(dim=1)
    # text → image: rank of the text's image
    order_t = torch.argsort(sim.t() if sim_t2i is None else sim_t2i, dim=1, descending=True)
    t2i_rank = (order_t == t2i_target[:, None]).float().argmax(dim=1)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((i2t_rank < k).float().mean())
        out[f"t2i_r{k}"] = 100.0 * float((t2i_rank < k).float().mean())
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (0-100), uniform weights, no smoothing."""
    matches, totals = [0] * 4, [0] * 4
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        c = tokenize(cand)
        rs = [tokenize(r) for r in refs]
        cand_len += len(c)
        ref_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
        for n in range(1, 5):
            cn = _ngrams(c, n)
            maxref: Counter = Counter()
            for r in rs:
                maxref |= _ngrams(r, n)
            matches[n - 1] += sum(min(v, maxref[g]) for g, v in cn.items())
            totals[n - 1] += max(len(c) - n + 1, 0)
    if min(matches) == 0 or cand_len == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    bp = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)
    return 100.0 * bp * math.exp(log_p)


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0) -> float:
    """CIDEr-D (coco-caption), averaged over images, times 10 as reported in papers."""
    refs_tok = [[tokenize(r) for r in refs] for refs in references]
    df: Counter = Counter()
    for refs in refs_tok:
        grams = set()
        for r in refs:
            for n in range(1, 5):
                grams.update(_ngrams(r, n))
        df.update(grams)
    log_n = math.log(float(len(references)))

    def vec(tokens: list[str]):
        out = []
        for n in range(1, 5):
            counts = _ngrams(tokens, n)
            v = {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in counts.items()}
            norm = math.sqrt(sum(x * x for x in v.values()))
            out.append((v, norm, counts))
        return out, len(tokens)

    scores = []
    for cand, refs in zip(candidates, refs_tok):
        (cv, clen) = vec(tokenize(cand))
        total = [0.0] * 4
        for r in refs:
            rv, rlen = vec(r)
            delta = clen - rlen
            for n in range(4):
                vc, nc, cc = cv[n]
                vr, nr, rc = rv[n]
                # CIDEr-D clips the candidate's tf-idf by the reference's for each n-gram.
                val = sum(min(vc[g], vr[g]) * vr[g] for g in vc if g in vr)
                if nc != 0 and nr != 0:
                    val /= nc * nr
                else:
                    val = 0.0
                total[n] += val * math.exp(-(delta**2) / (2 * sigma**2))
        score = sum(total) / 4 / len(refs) * 10.0
        scores.append(score)
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


#: the VQAv2 evaluation's answer normalisation (its vqaEval.py): these marks are dropped where they touch a space
#: (or anywhere in an answer with a digit-comma-digit), else they split words; a period goes unless a digit
#: follows; number words become digits; articles are dropped
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_VQA_PERIOD = re.compile(r"\.(?!\d)")  # the script's (?!<=\d)(\.)(?!\d) as it behaves: a period not before a digit
_VQA_COMMA = re.compile(r"(\d)(,)(\d)")
_VQA_DIGITS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
               "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = {"a", "an", "the"}


def normalize_answer(ans: str) -> str:
    """An answer as VQAv2's evaluation compares it: lower case, its punctuation rule, number words as digits,
    no articles (the official script's contraction repairs, "dont" → "don't", are not applied)."""
    text = " ".join(ans.replace("\n", " ").replace("\t", " ").strip().lower().split())
    out = text
    for p in _VQA_PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or _VQA_COMMA.search(text)) else " ")
    out = _VQA_PERIOD.sub("", out)
    words = [_VQA_DIGITS.get(w, w) for w in out.split()]
    return " ".join(w for w in words if w not in _VQA_ARTICLES)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean of min(#annotators who gave the prediction / 3, 1), in percent."""
    if not predictions:
        return 0.0
    total = 0.0
    for pred, gts in zip(predictions, answers):
        p = normalize_answer(pred)
        total += min(sum(normalize_answer(a) == p for a in gts) / 3.0, 1.0)
    return 100.0 * total / len(predictions)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    out = {}
    for k in ks:
        k_eff = min(k, logits.shape[1])
        top = logits.topk(k_eff, dim=1).indices
        out[f"top{k}"] = 100.0 * float((top == labels[:, None]).any(dim=1).float().mean())
    return out
