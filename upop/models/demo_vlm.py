"""demo-smolvlm built from nothing: a tiny Idefics3-shape model (SmolVLM's architecture) with its tokenizer,
chat template and processor, trained on the shapes set for VQA and captioning at once.

The vision tower is SigLIP-like (64 px images in 8 px patches: 64 patches), the connector folds 2x2 patches
into one token (16 image tokens per image), the language model is Llama-shape with grouped-query attention
(4 query heads sharing 2 KV heads) and a gated MLP. The tokenizer is word-level over the shapes grammar
(built offline with ``tokenizers``) plus the special tokens Idefics3's processor needs; the processor splits
no image (one image of the demo size), so every prompt holds the same image tokens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..run.checkpoint import atomic_dir
from .demo import IMAGE_SIZE, SHAPES_VERSION, vocabulary

PATCH = 8
SCALE_FACTOR = 2  # the connector's pixel shuffle: 2x2 patches per image token
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH) ** 2 // SCALE_FACTOR**2
#: the chat tokens (SmolVLM's names); "<|im_start|>" begins a conversation, "<end_of_utterance>" ends a turn
BOS, EOU, PAD, UNK = "<|im_start|>", "<end_of_utterance>", "<pad>", "<unk>"
IMAGE_TOKENS = ("<image>", "<fake_token_around_image>", "<global-img>")
CHAT_WORDS = ["user", "assistant", ":", ".", "describe"]
#: SmolVLM's template, shortened: "<|im_start|>User:<image>question<end_of_utterance>\nAssistant: answer<end_of_utterance>\n"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_chat_tokenizer(model_max_length: int = 128):
    """Word-level over the shapes grammar and the chat words; the chat and image tokens are special (matched
    before the words are split, never lower-cased)."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, UNK, BOS, EOU, *IMAGE_TOKENS]
    vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(vocabulary() + CHAT_WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOU,
                                   extra_special_tokens={"image_token": "<image>"}, chat_template=CHAT_TEMPLATE,
                                   model_max_length=model_max_length)


def build_processor(tokenizer, image_size: int = IMAGE_SIZE):
    """Idefics3's processor at ``image_size`` px: no image splitting, images resized to the demo size, pixels
    normalised to [-1, 1] (SigLIP's)."""
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    images = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": image_size},
                                    max_image_size={"longest_edge": image_size}, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, do_pad=True)
    seq = (image_size // PATCH) ** 2 // SCALE_FACTOR**2
    return Idefics3Processor(images, tokenizer, image_seq_len=seq, chat_template=CHAT_TEMPLATE)


def build_config(tokenizer, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                 image_size: int = IMAGE_SIZE) -> Any:
    """Idefics3Config of the demo's shape; the test variant passes fewer layers and a smaller width."""
    from transformers import Idefics3Config

    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in (("pad", PAD), ("bos", BOS), ("eos", EOU))}
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=PATCH)
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=256, rms_norm_eps=1e-5, pad_token_id=ids["pad"], bos_token_id=ids["bos"],
                eos_token_id=ids["eos"], tie_word_embeddings=False)
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=SCALE_FACTOR,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=ids["pad"],
                            tie_word_embeddings=False)
    config.architectures = ["Idefics3ForConditionalGeneration"]
    return config


def build_model(tokenizer, seed: int = 0, **shape: Any):
    """A randomly initialised demo-shape model whose generation stops at the end of the answer's turn."""
    from transformers import Idefics3ForConditionalGeneration

    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(build_config(tokenizer, **shape))
    eou = tokenizer.convert_tokens_to_ids(EOU)
    model.generation_config.eos_token_id = eou
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _hooks(model: Any) -> Any:
    """The family adapter when one is registered; the chat tasks call none of its hooks, so they also train
    the demo where the idefics3 adapter is not installed."""
    from ..adapters import get_adapter
    from ..errors import UnsupportedModelError

    try:
        return get_adapter(model.config.model_type)
    except UnsupportedModelError:
        return None


def train_smolvlm(out_dir: str | Path, data_dir: str | Path, epochs: int = 12, lr: float = 1e-3,
                  batch_size: int = 64, seed: int = 0, shape: dict[str, Any] | None = None,
                  eval_limit: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains demo-smolvlm from nothing on the shapes set's VQA questions and captions mixed, and writes it
    (model, processor, and a summary with its test VQA accuracy and caption CIDEr) to ``out_dir``."""
    from ..run.config import RetrainConfig
    from ..tasks.chat import ChatCaption, ChatVQA, mixed_batches
    from ..tasks.base import Preprocessor
    from ..training.retrain import retrain

    tokenizer = build_chat_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, seed, **(shape or {}))
    prep = Preprocessor(tokenizer, processor.image_processor, processor=processor)
    hooks = _hooks(model)
    vqa = ChatVQA(hooks, prep, data_dir, batch_size=batch_size, seed=seed, model=model)
    cap = ChatCaption(hooks, prep, data_dir, batch_size=batch_size, seed=seed, model=model)
    batches = mixed_batches([vqa, cap], batch_size, seed)
    log(f"demo-smolvlm: {sum(p.numel() for p in model.parameters()):,} parameters, {len(batches)} steps per epoch")
    t0 = time.perf_counter()
    res = retrain(model, vqa.loss, batches,
                  RetrainConfig(epochs=epochs, lr=lr, weight_decay=0.05, warmup_ratio=0.05, seed=seed),
                  eval_fn=vqa.metric_fn("val", limit=100),
                  progress=lambda r: log(f"  step {int(r['step'])}/{int(r['total'])} loss {r['loss']:.3f}")
                  if int(r["step"]) % 50 == 0 else None)
    seconds = time.perf_counter() - t0
    # primary: the demo's default task's metric (VQA accuracy); the caption metrics beside it
    test = {**cap.evaluate(model, "test", eval_limit), **vqa.evaluate(model, "test", eval_limit)}
    summary = {"name": "demo-smolvlm", "task": "vqa", "tasks_trained": ["vqa", "caption"], "test": test,
               "best_val": res.best_metric, "best_epoch": res.best_epoch, "train_seconds": round(seconds, 1),
               "seed": seed, "data": SHAPES_VERSION, "epochs": epochs, "lr": lr, "batch_size": batch_size}
    with atomic_dir(Path(out_dir), kind="demo") as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "upop_demo.json").write_text(json.dumps(summary, indent=2))
        for f in tmp.iterdir():
            f.chmod(0o644)
    log(f"demo-smolvlm: test {json.dumps({k: round(v, 2) for k, v in test.items()})}, trained in {seconds:.0f}s")
    return summary
