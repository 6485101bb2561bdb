"""BLIP's [ENC] token: found in the tokenizer or as the text embedding's row after [DEC] (its use: the ITM's in
tests/unit/tasks/test_retrieval.py, the VQA question encoder's in tests/unit/tasks/test_tasks.py, NLVR's below)."""

from types import SimpleNamespace

import torch

from upop.models.demo import build_tokenizer
from upop.models import enc_token
from upop.models.enc_token import enc_token_id, text_embedding, with_enc

from ...conftest import build_tiny


def _tokenizer(*added: str):
    tok = build_tokenizer()
    for t in added:
        tok.add_special_tokens({"additional_special_tokens": [t]})
    return tok


def test_the_tokenizers_own_enc_wins():
    tok = _tokenizer("[ENC]")
    assert enc_token_id(tok) == enc_token_id(tok, 12345) == tok.convert_tokens_to_ids("[ENC]")


def _bert_like(words: list[str]):
    """A word-level tokenizer ending at [DEC], as BLIP's is before [ENC] is added (bert-base-uncased + [DEC])."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words, "[DEC]"])}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                   pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   bos_token="[DEC]")


def test_enc_is_the_row_after_dec_where_the_embedding_ends_there():
    """BLIP's tokenizer adds [DEC] then [ENC] to bert-base-uncased's 30,522 tokens; transformers' converted
    checkpoints keep all 30,524 embedding rows ([DEC] = bos_token_id 30,522) but ship the bare 30,522-token
    tokenizer, or one ending at [DEC]: either way [ENC] is 30,523."""
    bare = _bert_like(["red", "circle"])
    bare_n = len(bare) - 1  # the same words without the final [DEC]
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "red", "circle"])}
    hub_like = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                       pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    assert len(hub_like) == bare_n
    dec = bare_n  # the config's bos_token_id, one past the bare tokenizer
    assert enc_token_id(hub_like, dec + 2, dec) == dec + 1  # the hub case: 30,522 tokens, [DEC] 30,522, 30,524 rows
    assert enc_token_id(bare, dec + 2, dec) == dec + 1  # a tokenizer that ends at [DEC]
    assert enc_token_id(hub_like, dec + 1, dec) is None and enc_token_id(hub_like, dec + 3, dec) is None
    assert enc_token_id(hub_like, dec + 2, None) is None and enc_token_id(hub_like, None, dec) is None
    assert enc_token_id(hub_like, dec + 2, dec - 2) is None  # the tokenizer runs past the [DEC] id
    assert enc_token_id(hub_like, dec + 2, dec, taken=(dec + 1,)) is None  # that row is [SEP], say
    demo = build_tokenizer()  # [DEC] inside the vocabulary (id 5), no extra row: no [ENC]
    assert enc_token_id(demo, len(demo), demo.bos_token_id) is None
    assert enc_token_id(None, 10, 8) is None


def test_the_tokenizers_own_enc_needs_its_embedding_row():
    tok = _tokenizer("[ENC]")
    enc = tok.convert_tokens_to_ids("[ENC]")
    assert enc_token_id(tok, enc + 1, 0) == enc and enc_token_id(tok, enc, 0) is None


def test_text_embedding_reads_the_text_config():
    model = build_tiny("blip", "BlipForQuestionAnswering", vocab=99)
    t = model.config.text_config
    assert text_embedding(model) == (99, t.bos_token_id, (t.sep_token_id, t.eos_token_id, t.pad_token_id))
    assert text_embedding(None) == (None, None, ()) == text_embedding(SimpleNamespace(config=SimpleNamespace()))
    flag = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(vocab_size=True, bos_token_id=3)))
    assert text_embedding(flag) == (None, 3, ())


def test_with_enc_replaces_the_first_token_and_leaves_the_input(capsys, monkeypatch):
    ids = torch.tensor([[1, 5, 6], [1, 7, 0]])
    out = with_enc(ids, 42, "ITM")
    assert out[:, 0].tolist() == [42, 42] and out[:, 1:].tolist() == ids[:, 1:].tolist() and ids[0, 0] == 1
    monkeypatch.setattr(enc_token, "_SAID", set())
    assert with_enc(ids, None, "question encoder") is ids and with_enc(ids, None, "question encoder") is ids
    assert capsys.readouterr().err.count("BLIP's question encoder reads [CLS]") == 1


def test_an_nlvr_model_from_a_converted_retrieval_model_reads_enc():
    """init_from keeps the [ENC] row the retrieval model's ITM encoder learned (transformers' BLIP: 30,523)."""
    from upop.adapters import get_adapter

    retrieval = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99)
    t = retrieval.config.text_config
    assert get_adapter("blip_nlvr").init_from(retrieval).config.enc_token_id is None  # row 98 is the tiny [SEP]
    t.sep_token_id = t.eos_token_id = 3
    assert get_adapter("blip_nlvr").init_from(retrieval).config.enc_token_id == 98
