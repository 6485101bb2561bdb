import math

import pytest
import torch

from upop.tasks.metrics import bleu4, cider_d, recall_at_k, topk_accuracy, vqa_accuracy


def test_recall_on_a_perfect_similarity_matrix_is_100():
    # 3 images, 2 captions each; text j belongs to image j // 2.
    text_img = [0, 0, 1, 1, 2, 2]
    sim = torch.tensor([[1.0 if t == i else 0.0 for t in text_img] for i in range(3)])
    r = recall_at_k(sim, text_img)
    assert all(v == 100.0 for v in r.values())


def test_recall_by_hand():
    # 2 images, 1 caption each; image 0 ranks its caption second, image 1 first.
    sim = torch.tensor([[0.1, 0.9], [0.0, 0.8]])
    r = recall_at_k(sim, [0, 1], ks=(1, 2))
    assert r["i2t_r1"] == 50.0 and r["i2t_r2"] == 100.0
    # text 0: images scored [0.1, 0.0] -> its image 0 first; text 1: [0.9, 0.8] -> image 1 second.
    assert r["t2i_r1"] == 50.0 and r["t2i_r2"] == 100.0
    assert r["r_mean"] == 75.0


def test_bleu4_by_hand():
    assert bleu4(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    # p1..p4 = 4/5, 3/4, 2/3, 1/2 and equal lengths: BLEU = (0.2)^(1/4)
    assert bleu4(["a b c d e"], [["a b c d f"]]) == pytest.approx(100 * 0.2 ** 0.25)
    # brevity penalty: 4 candidate words against the closest reference of 6 -> exp(1 - 6/4)
    assert bleu4(["a b c d"], [["a b c d e f", "x y z w v u t s"]]) == pytest.approx(100 * math.exp(1 - 6 / 4))
    assert bleu4(["q r s t"], [["a b c d"]]) == 0.0


def test_cider_d_by_hand():
    # Each image's n-grams occur in one of two documents: idf = log 2 for all, and a candidate equal
    # to its only reference scores 1 on n = 1, 2 and 0 on n = 3, 4 (no such n-grams): (1+1)/4 * 10 = 5.
    assert cider_d(["a b", "c d"], [["a b"], ["c d"]]) == pytest.approx(500.0)
    # An n-gram present in every document has idf 0 and contributes nothing.
    assert cider_d(["z", "z"], [["z"], ["z"]]) == 0.0
    # "a a b b" vs "a b": n=1 clipped cosine 2/4, n=2 {aa, ab, bb} vs {ab}: 1/sqrt(3), n=3,4: 0;
    # two words longer: Gaussian penalty exp(-2²/(2·6²)). The second image scores 5 as above.
    first = (0.5 + 1 / math.sqrt(3)) / 4 * 10 * math.exp(-4 / 72)
    assert cider_d(["a a b b", "c d"], [["a b"], ["c d"]]) == pytest.approx(100 * (first + 5) / 2)


def test_vqa_accuracy_by_hand():
    assert vqa_accuracy(["red"], [["red", "red", "red"]]) == 100.0
    assert vqa_accuracy(["red"], [["red", "red", "blue"]]) == pytest.approx(200 / 3)
    assert vqa_accuracy(["Red."], [["red", "blue", "blue"]]) == pytest.approx(100 / 3)
    assert vqa_accuracy(["green", "red"], [["red"] * 3, ["red"] * 10]) == 50.0


def test_topk_by_hand():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    r = topk_accuracy(logits, torch.tensor([2, 0]), ks=(1, 2))
    assert r == {"top1": 50.0, "top2": 100.0}
