"""How far the statement alone goes on the shapes NLVR split: the accuracy of answering with the
training set's majority label for each statement (exact sentence, and its template with colours,
shapes and numbers blanked). A model has to beat these to be looking at the images.

    python benchmarks/nlvr_text_prior.py [DATA_DIR]   (default: the demo's shapes set)
"""

import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from upop.datasets.readers import read_nlvr
from upop.datasets.shapes import COLOURS, COUNT_WORDS, SHAPES

data = Path(sys.argv[1]) if len(sys.argv) > 1 else None
if data is None:
    from upop.models.demo import shapes_dir

    data = shapes_dir()
train, test = read_nlvr(data / "nlvr_train.json"), read_nlvr(data / "nlvr_test.json")
blank = re.compile(r"\b(" + "|".join([*COLOURS, *SHAPES, *COUNT_WORDS.values()]) + r")\b")


def prior_accuracy(key) -> float:
    votes: dict[str, Counter] = defaultdict(Counter)
    for r in train:
        votes[key(r.sentence)][r.label] += 1
    overall = Counter(r.label for r in train).most_common(1)[0][0]
    right = sum((votes[key(r.sentence)].most_common(1)[0][0] if key(r.sentence) in votes else overall) == r.label
                for r in test)
    return 100.0 * right / len(test)


print("| baseline (test split) | accuracy |")
print("|---|---|")
print(f"| majority label | {100.0 * max(Counter(r.label for r in test).values()) / len(test):.1f} |")
print(f"| majority per template | {prior_accuracy(lambda s: blank.sub('_', s)):.1f} |")
print(f"| majority per exact sentence | {prior_accuracy(lambda s: s):.1f} |")
