"""demo-smolvlm on the shapes test split: VQA accuracy per question kind, caption BLEU-4 / CIDEr-D, and the
greedy evaluation's time. Prints a table.

    python benchmarks/chat_demo.py [--model demo-smolvlm | FOLDER] [--split test]
"""

import argparse
import time
from collections import defaultdict

import transformers

from upop.models.demo import demo_path, is_demo, shapes_dir
from upop.tasks.base import Preprocessor
from upop.tasks.chat import ChatCaption, ChatVQA
from upop.tasks.metrics import vqa_accuracy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-smolvlm")
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    path = demo_path(args.model) if is_demo(args.model) else args.model
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=False).eval()
    prep = Preprocessor.from_pretrained(path)
    vqa = ChatVQA(None, prep, shapes_dir(), model=model)  # the chat tasks call no adapter hook
    recs = vqa._records(args.split)
    t0 = time.perf_counter()
    preds = vqa.predict_all(model, recs, lambda c, px: vqa.generate(model, [r.question for r in c], px),
                            lambda r: [r.image])
    vqa_s = time.perf_counter() - t0
    kinds: dict[str, tuple[list[str], list[list[str]]]] = defaultdict(lambda: ([], []))
    for r, p in zip(recs, preds):
        kind = " ".join(r.question.split()[:2])  # "how many", "what color", "what shape", "is there"
        kinds[kind][0].append(p)
        kinds[kind][1].append(r.answers)
    t0 = time.perf_counter()
    captioner = ChatCaption(None, prep, shapes_dir(), model=model)
    cap = captioner.evaluate(model, args.split)
    cap_s = time.perf_counter() - t0
    print(f"| {args.model} ({args.split}) | items | metric | value |")
    print("|---|---|---|---|")
    print(f"| VQA, all | {len(recs)} | VQA accuracy | {vqa_accuracy(preds, [r.answers for r in recs]):.1f} |")
    for kind, (ps, gs) in sorted(kinds.items()):
        print(f"| VQA, \"{kind} ...\" | {len(ps)} | VQA accuracy | {vqa_accuracy(ps, gs):.1f} |")
    n_images = len(captioner._records(args.split))
    print(f"| captions | {n_images} images | BLEU-4 / CIDEr-D | {cap['bleu4']:.1f} / {cap['cider']:.1f} |")
    print(f"\ngreedy evaluation: VQA {vqa_s:.1f} s, captions {cap_s:.1f} s (this machine, as loaded as it is)")


if __name__ == "__main__":
    main()
