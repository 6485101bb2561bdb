"""The built-in offline demo: small BLIP, CLIP and ViT models trained on the shapes set.

The trained folders ship inside the package (``upop/demo_models/<name>``), so a fresh install
runs ``upop compress --model demo-blip --ratio 0.5`` with no download. ``train_demo`` rebuilds
any of them from nothing (tokenizer from the shapes grammar with the ``tokenizers`` library,
image processor, model from a config, training on the shapes set); ``scripts/train_demos.py``
is how the shipped ones were made.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters import get_adapter
from ..datasets import shapes as make_shapes
from ..datasets.shapes import COLOURS, COUNT_WORDS, POSITIONS, SHAPES, SIZES
from ..run.checkpoint import atomic_dir
from ..errors import ConfigError, ModelLoadError, OutputError
from ..run.safety import cache_root, check_replace

SHAPES_VERSION = "shapes-v2"  # v2 adds nlvr_<split>.json; every other file is as in v1
DEMO_ROOT = Path(__file__).resolve().parent.parent / "demo_models"
IMAGE_SIZE = 64


@dataclass(frozen=True)
class DemoSpec:
    name: str
    family: str
    class_name: str
    task: str
    epochs: int
    lr: float
    batch_size: int
    # what `upop compress --model <demo>` uses unless told otherwise
    compress_search_epochs: int = 2
    compress_retrain_epochs: int = 4
    compress_lr: float = 2e-4
    # a demo this one starts from (another class: the family adapter's ``init_from`` converts it)
    base: str | None = None
    # task options of compress runs on the built-in data, under any the caller gives
    task_options: dict[str, Any] = field(default_factory=dict)
    # "module:function" in upop.models that builds and trains the demo itself (a family whose model, tokenizer and
    # processor are built by a module of their own); called as train_demo's stand-in with its arguments
    trainer: str | None = None


DEMOS = {
    # ITM re-ranks the ITC top 16: the reference's 256 would re-rank 171,200 pairs of the 200-image, 600-text test
    # split per evaluation (13x as many as at 16: minutes on a CPU, for every evaluation of a demo run)
    # A retrieval epoch is every (image, caption) pair: 3 per shapes image, so one search and one retrain epoch
    # (93 + 93 steps at batch 64) take the run time the earlier 2 + 4 image epochs (62 + 124 steps) took.
    "demo-blip": DemoSpec("demo-blip", "blip", "BlipForImageTextRetrieval", "retrieval", 40, 5e-4, 64,
                          compress_search_epochs=1, compress_retrain_epochs=1, task_options={"k_test": 16}),
    "demo-clip": DemoSpec("demo-clip", "clip", "CLIPModel", "retrieval", 60, 1e-3, 128,
                          compress_search_epochs=1, compress_retrain_epochs=1),
    "demo-vit": DemoSpec("demo-vit", "vit", "ViTForImageClassification", "classification", 60, 1e-3, 64),
    "demo-blip-nlvr": DemoSpec("demo-blip-nlvr", "blip_nlvr", "BlipNlvrForVisualReasoning", "nlvr", 40, 3e-4, 32,
                               base="demo-blip"),
    # Idefics3 shape (SmolVLM's): trained on the shapes set's VQA questions and captions mixed (upop.models.demo_vlm)
    "demo-smolvlm": DemoSpec("demo-smolvlm", "idefics3", "Idefics3ForConditionalGeneration", "vqa", 12, 1e-3, 64,
                             compress_search_epochs=1, compress_retrain_epochs=1, trainer="demo_vlm:train_smolvlm"),
}


def cache_dir() -> Path:
    return cache_root()


def shapes_dir() -> Path:
    """The default demo data: the shapes set with the default seed, written on first use. A folder of
    that name that upop did not write completely is the user's: refused, never replaced."""
    out = cache_dir() / SHAPES_VERSION
    if not (out / ".complete").is_file():
        try:
            check_replace(out, overwrite=True, kind="shapes", in_cache=True)
            with atomic_dir(out, kind="shapes") as tmp:
                make_shapes(tmp)
                (tmp / ".complete").write_text("")
        except OSError as exc:
            raise OutputError(f"cannot write the demo data to upop's cache {out.parent} (UPOP_CACHE): "
                              f"{exc.strerror or exc}") from None
    return out


def is_demo(name: str) -> bool:
    return name in DEMOS


def demo_path(name: str) -> Path:
    path = DEMO_ROOT / name
    if not (path / "config.json").is_file():
        cached = cache_dir() / "demos" / name
        if (cached / "config.json").is_file():
            return cached
        raise ModelLoadError(f"demo model {name} is not installed; build it with: python scripts/train_demos.py {name}")
    return path


def vocabulary() -> list[str]:
    words = ["a", "on", "the", "in", "and", "of", "only", "left", "right", "middle", "shape", "shapes", "is",
             "are", "there", "what", "color", "how", "many", "yes", "no", ",", "?", "photo"]
    words += list(COLOURS) + list(SHAPES) + list(SIZES) + list(POSITIONS) + list(COUNT_WORDS.values())
    # Appended, never inserted: a tokenizer built later keeps the ids of one built earlier, so a
    # model trained with it (demo-blip) can initialise one that needs the new words (demo-blip-nlvr).
    words += ["both", "images", "image", "contain", "contains", "exactly", "more", "than", "has", "have", "same",
              "number", "total", "each"]
    return list(dict.fromkeys(words))


def build_tokenizer(model_max_length: int = 40):
    """A word-level tokenizer over the shapes grammar, built offline with ``tokenizers``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {w: i for i, w in enumerate(specials + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]",
                                   model_max_length=model_max_length)


def build_config(spec: DemoSpec, tokenizer, num_labels: int = 12) -> Any:
    """The demo's architecture: 4 layers of width 64 per tower, 64 px images in 8 px patches."""
    return get_adapter(spec.family).small_config(
        spec.class_name, hidden=64, layers=4, heads=4, image_size=IMAGE_SIZE, patch_size=8, vocab=len(tokenizer),
        token_ids=dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.sep_token_id, sep_token_id=tokenizer.sep_token_id),
        num_labels=num_labels)


def train_demo(name: str, out_dir: str | Path | None = None, data_dir: str | Path | None = None,
               epochs: int | None = None, seed: int = 0, init_from: str | Path | None = None,
               lr: float | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train demo model ``name`` on the shapes set and save it as a normal HF folder.

    From scratch by default; ``init_from`` continues from an earlier demo folder (a second
    stage, recorded in the summary)."""
    from ..training.retrain import retrain
    from ..run.config import RetrainConfig
    from ..tasks import Preprocessor, make_task

    spec = DEMOS[name]
    data = Path(data_dir) if data_dir is not None else shapes_dir()
    out = Path(out_dir) if out_dir is not None else DEMO_ROOT / name
    if spec.trainer is not None:
        if init_from is not None:
            raise ConfigError(f"{name} is trained from nothing only; run it without --init-from")
        module, function = spec.trainer.split(":")
        train = getattr(importlib.import_module(f"{__package__}.{module}"), function)
        return train(out, data, epochs=epochs or spec.epochs, lr=lr or spec.lr, batch_size=spec.batch_size, seed=seed,
                     log=log)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    prep = Preprocessor(tokenizer, get_adapter(spec.family).image_processor(IMAGE_SIZE))
    adapter = get_adapter(spec.family)
    labels = sorted(p.name for p in (data / "classification" / "train").iterdir()) if spec.task == "classification" else []
    config = build_config(spec, tokenizer, num_labels=len(labels) or 12)
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {v: k for k, v in config.id2label.items()}
    if init_from is not None:
        model = adapter.model_class(spec.class_name).from_pretrained(  # type: ignore[attr-defined]
            str(init_from), trust_remote_code=False)
        previous = json.loads((Path(init_from) / "upop_demo.json").read_text())
    elif spec.base is not None:
        base = DEMOS[spec.base]
        # Read directly (not through upop.models.hub, which imports this module to find the demos).
        source = get_adapter(base.family).model_class(base.class_name).from_pretrained(
            str(demo_path(spec.base)), trust_remote_code=False)
        model = adapter.init_from(source)
        # The tokenizer only ever gains words at its end: old ids keep their embeddings.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model.config.text_config.vocab_size = len(tokenizer)
        previous = {"initialised_from": spec.base}
    else:
        model = adapter.build(spec.class_name, config)
        previous = None
    model.config.architectures = [spec.class_name]
    task = make_task(adapter, spec.task, prep, data, model=model, batch_size=spec.batch_size, seed=seed)
    t0 = time.perf_counter()
    batches = task.train_batches()
    log(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, {len(batches)} steps per epoch")
    res = retrain(model, task.loss, batches,
                  RetrainConfig(epochs=epochs or spec.epochs, lr=lr or spec.lr, weight_decay=0.05, warmup_ratio=0.05,
                                seed=seed),
                  eval_fn=task.metric_fn("val", limit=100),
                  progress=lambda r: log(f"  step {int(r['step'])}/{int(r['total'])} loss {r['loss']:.3f}")
                  if int(r["step"]) % 100 == 0 else None)
    test = task.evaluate(model, "test")
    seconds = time.perf_counter() - t0
    summary = {"name": name, "task": spec.task, "test": test, "best_val": res.best_metric,
               "best_epoch": res.best_epoch, "train_seconds": round(seconds, 1), "seed": seed,
               "data": SHAPES_VERSION, "epochs": epochs or spec.epochs, "lr": lr or spec.lr,
               "continued_from": previous}
    with atomic_dir(out, kind="demo") as tmp:
        _write_demo(tmp, model, prep, summary)
    log(f"{name}: test {json.dumps({k: round(v, 2) for k, v in test.items()})} in {seconds:.0f}s")
    return summary


def _write_demo(tmp: Path, model: Any, prep: Any, summary: dict[str, Any]) -> None:
    model.save_pretrained(tmp)
    prep.save_pretrained(tmp)
    (tmp / "upop_demo.json").write_text(json.dumps(summary, indent=2))
    for f in tmp.iterdir():
        f.chmod(0o644)
