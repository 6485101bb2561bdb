"""The best text→image R@1 any model can reach on the shapes test split.

Captions that leave out a size or the middle shape fit several images; a perfect model ranks one
of the fitting images first at random, so each caption scores 1/(number of images it fits).
Fit is decided by parsing the caption against every scene.

    python benchmarks/retrieval_ceiling.py [--data DIR] [--split test]
"""

import argparse
import json
from pathlib import Path

from upop.datasets.shapes import facts_hold, parse_caption, scene_from_json
from upop.models.demo import shapes_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    data = args.data or shapes_dir()
    scenes = [scene_from_json(s["objects"]) for s in json.loads((data / f"scenes_{args.split}.json").read_text())]
    scores = []
    for rec in json.loads((data / f"retrieval_{args.split}.json").read_text()):
        for cap in rec["caption"]:
            facts = parse_caption(cap)
            scores.append(1.0 / sum(facts_hold(facts, s) for s in scenes))
    print(f"{data} {args.split}: {len(scores)} captions, text→image R@1 ceiling {100 * sum(scores) / len(scores):.1f}")


if __name__ == "__main__":
    main()
