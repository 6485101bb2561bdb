"""The chat tasks (VQA and captioning as a causal LM under the model's chat template) on a tiny Idefics3-shape
model built from nothing: prompt masking, greedy evaluation, distillation; and the demo-smolvlm builder."""

from __future__ import annotations

import pytest
import torch

from upop.datasets.shapes import shapes
from upop.models import demo_vlm
from upop.tasks.base import Preprocessor, task_class
from upop.tasks.chat import ChatCaption, ChatVQA, answer_loss, chat_inputs, prompt_inputs
from upop.tasks.metrics import normalize_answer, vqa_accuracy

TINY = {"hidden": 32, "layers": 1, "heads": 4, "kv_heads": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes(tmp_path_factory.mktemp("chat") / "shapes", train=6, val=3, test=3,
                  classification_per_class=(1, 1, 1))


@pytest.fixture(scope="module")
def parts():
    tok = demo_vlm.build_chat_tokenizer()
    proc = demo_vlm.build_processor(tok)
    return tok, proc, demo_vlm.build_model(tok, **TINY).eval()


def _task(cls, parts, data, **kw):
    tok, proc, model = parts
    # The chat tasks call no adapter hook: the HF model alone is enough here.
    return cls(None, Preprocessor(tok, proc.image_processor, processor=proc), data, batch_size=4, model=model, **kw)


def test_the_chat_tasks_register_for_both_families():
    assert task_class("chat-vqa") is ChatVQA and task_class("chat-caption") is ChatCaption
    from upop.tasks.base import _SERVES

    for family in ("llava", "idefics3"):
        assert _SERVES[(family, "vqa")] == "chat-vqa" and _SERVES[(family, "caption")] == "chat-caption"
    assert {"Idefics3ForConditionalGeneration", "LlavaForConditionalGeneration"} <= set(ChatVQA.model_classes)


def test_labels_are_minus_100_exactly_on_the_prompt_and_image_tokens(parts, data):
    task = _task(ChatVQA, parts, data)
    tok, enc = parts[0], task.encoder
    prompts, answers = ["how many shapes are there?", "what color is the shape on the left?"], ["two", "red"]
    out = chat_inputs(enc, prompts, answers)
    for k, (p, a) in enumerate(zip(prompts, answers)):
        head = enc.prompt_ids(p)
        n = len(head) + len(enc.answer_ids(p, a))
        ids, labels = out["input_ids"][k], out["labels"][k]
        assert (labels[: len(head)] == -100).all()  # the prompt, its image tokens among them
        assert (ids[: len(head)] == enc.image_token_id).sum() == demo_vlm.IMAGE_SEQ_LEN
        assert torch.equal(labels[len(head): n], ids[len(head): n])  # the answer is learnt, all of it
        assert tok.convert_ids_to_tokens(labels[len(head): n].tolist()) == [a, demo_vlm.EOU]
        assert (labels[n:] == -100).all() and (out["attention_mask"][k, n:] == 0).all()  # padding: right, unlearnt


def test_prompt_inputs_pad_on_the_left_so_answers_start_together(parts, data):
    enc = _task(ChatVQA, parts, data).encoder
    out = prompt_inputs(enc, ["what shape is?", "how many shapes are there?"])
    assert (out["attention_mask"][:, -1] == 1).all()
    assert out["input_ids"][0, 0] == enc.tokenizer.pad_token_id and out["attention_mask"][0, 0] == 0


def test_the_loss_reads_only_the_answer_tokens(parts, data):
    task = _task(ChatVQA, parts, data)
    enc = chat_inputs(task.encoder, ["how many shapes are there?"], ["two"])
    logits = torch.randn(1, enc["input_ids"].shape[1], len(parts[0]))
    changed = logits.clone()
    # The answer is the last two tokens ("two", end of turn): positions -3 and -2 predict them, the last predicts none.
    changed[0, :-3] += torch.randn_like(changed[0, :-3])
    changed[0, -1] += torch.randn_like(changed[0, -1])
    assert answer_loss(changed, enc["labels"]) == answer_loss(logits, enc["labels"])
    changed[0, -3] += 5 * torch.randn_like(changed[0, -3])
    assert answer_loss(changed, enc["labels"]) != answer_loss(logits, enc["labels"])


@pytest.mark.parametrize("pred,answers,expected", [
    ("Red.", ["red", "red", "red"], 100.0),
    ("two", ["2", "2", "blue"], 200 / 3),  # number words are digits
    ("the circle", ["circle", "a circle", "an circle"], 100.0),  # articles are dropped
    ("yes!", ["yes", "no", "no"], 100 / 3),  # punctuation touching a space or the end goes
    ("left-right", ["left right"] * 3, 100.0),  # a hyphen inside a word splits it
    ("3.5", ["35"] * 3, 0.0),  # a decimal point stays
    ("1,000", ["1000"] * 3, 100.0),  # a digit-comma-digit answer loses its commas
])
def test_vqa_accuracy_normalises_answers_as_vqav2(pred, answers, expected):
    assert vqa_accuracy([pred], [answers]) == pytest.approx(expected)


def test_vqav2_normalisation_by_hand():
    assert normalize_answer("  The  TWO red Squares? ") == "2 red squares"
    assert normalize_answer("none") == "0"


def test_greedy_evaluation_runs_end_to_end_and_gives_the_metrics(parts, data):
    vqa = _task(ChatVQA, parts, data, max_new_tokens=3)
    res = vqa.evaluate(parts[2], "test")
    assert set(res) == {"vqa_acc", "primary"} and 0.0 <= res["primary"] <= 100.0
    cap = _task(ChatCaption, parts, data, max_new_tokens=4)
    res = cap.evaluate(parts[2], "val", limit=2)
    assert {"bleu4", "cider", "primary"} <= set(res) and res["primary"] == res["cider"]


def test_greedy_answers_are_those_the_model_scores_highest(parts, data):
    """The decoded answer is the argmax chain of the model's own logits from the prompt (the left padding
    and the end-of-turn cut change nothing)."""
    task = _task(ChatVQA, parts, data, max_new_tokens=3)
    rec = task._records("test")[0]
    px = task.images.get([rec.image])
    assert px.shape == (1, 1, 3, 64, 64)  # Idefics3's layout, [batch, images per item, 3, H, W], as its processor gives
    ids = torch.tensor([task.encoder.prompt_ids(rec.question)])
    model, chain = parts[2], []
    with torch.no_grad():
        for _ in range(3):
            nxt = int(model(pixel_values=px, input_ids=ids).logits[0, -1].argmax())
            chain.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert task.generate(model, [rec.question], px) == [task.encoder.decode(chain)]


def test_distillation_kl_is_zero_for_the_teacher_itself_and_positive_otherwise(parts, data):
    task = _task(ChatCaption, parts, data)
    batch = next(iter(task.train_batches()))
    model = parts[2]
    with torch.no_grad():
        student = task.forward(model, batch)
        teacher = task.forward(model, batch, guide=student)
        assert task.distill_terms(student, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-7)
        other = demo_vlm.build_model(parts[0], seed=1, **TINY).eval()
        assert task.distill_terms(student, task.forward(other, batch, guide=student), 2.0).item() > 1e-4


def test_a_training_step_lowers_the_answer_loss(parts, data):
    task = _task(ChatVQA, parts, data)
    model = demo_vlm.build_model(parts[0], **TINY).train()
    batch = next(iter(task.train_batches()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = task.loss(model, batch)
    for _ in range(3):
        opt.zero_grad()
        task.loss(model, batch).backward()
        opt.step()
    assert task.loss(model, batch) < before


def test_the_demo_builds_from_nothing_and_reloads(data, tmp_path):
    """A short demo-smolvlm run from nothing (tiny shape, one epoch): the saved folder is an ordinary HF
    folder whose processor and chat template reload, with its measured metrics."""
    import json

    import transformers

    out = tmp_path / "demo"
    summary = demo_vlm.train_smolvlm(out, data, epochs=1, batch_size=8, shape=TINY, log=lambda _s: None)
    assert {"vqa_acc", "cider", "bleu4", "primary"} <= set(summary["test"])
    assert json.loads((out / "upop_demo.json").read_text())["test"] == summary["test"]
    model = transformers.AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=False)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert model.config.text_config.num_key_value_heads == 2
    prep = Preprocessor.from_pretrained(out)
    again = ChatVQA(None, prep, data, model=model)
    assert again.encoder.image_ids == _task(ChatVQA, (prep.tokenizer, prep.multimodal(), model), data).encoder.image_ids
    assert again.encoder.prompt_ids("how many shapes are there?")[-2:] == prep.tokenizer.convert_tokens_to_ids(
        ["assistant", ":"])
    prep.save_pretrained(tmp_path / "slim")  # what a slim checkpoint keeps: the processor, its template with it
    slim = Preprocessor.from_pretrained(tmp_path / "slim")
    assert ChatVQA(None, slim, data, model=model).encoder.prompt_ids("is there a red circle?") == \
        again.encoder.prompt_ids("is there a red circle?")


def test_left_padding_changes_no_generated_logit(parts, data):
    """A prompt decoded in a batch beside a longer one (so padded on the left) scores every step as alone."""
    task = _task(ChatVQA, parts, data)
    recs = task._records("test")[:2]
    px = task.images.get([r.image for r in recs])
    prompts = ["what shape is?", "how many shapes are there?"]
    kw = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        both = parts[2].generate(pixel_values=px, **prompt_inputs(task.encoder, prompts), **kw)
        alone = parts[2].generate(pixel_values=px[:1], **prompt_inputs(task.encoder, prompts[:1]), **kw)
    for step_both, step_alone in zip(both.logits, alone.logits):
        torch.testing.assert_close(step_both[0], step_alone[0], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def llava_parts():
    """A tiny LLaVA-style model (CLIP vision tower, projector, Llama-shape LM with GQA) and its LLaVA processor
    (the image token expanded to one token per patch, CLS dropped), with the demo's tokenizer and template."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = demo_vlm.build_chat_tokenizer()
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = LlavaProcessor(images, tok, patch_size=8, vision_feature_select_strategy="default",
                          chat_template=demo_vlm.CHAT_TEMPLATE, num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return tok, proc, LlavaForConditionalGeneration(config).eval()


def test_a_llava_model_trains_and_decodes_under_its_processor(llava_parts, data):
    tok, proc, model = llava_parts
    task = ChatVQA(None, Preprocessor(tok, proc.image_processor, processor=proc), data, batch_size=4, model=model,
                   max_new_tokens=2)
    assert task.encoder.image_ids == [task.encoder.image_token_id] * 16  # (32 / 8)² patches, the CLS token dropped
    batch = next(iter(task.train_batches()))
    assert torch.isfinite(task.loss(model, batch))
    assert 0.0 <= task.evaluate(model, "test")["primary"] <= 100.0


def test_train_demo_hands_demo_smolvlm_to_its_own_trainer(data, tmp_path):
    from upop.errors import ConfigError
    from upop.models.demo import train_demo

    summary = train_demo("demo-smolvlm", out_dir=tmp_path / "d", data_dir=data, epochs=1, log=lambda _s: None)
    assert summary["epochs"] == 1 and summary["tasks_trained"] == ["vqa", "caption"]
    assert (tmp_path / "d" / "processor_config.json").is_file()
    with pytest.raises(ConfigError, match="from nothing only"):
        train_demo("demo-smolvlm", out_dir=tmp_path / "e", data_dir=data, init_from=tmp_path / "d")
