"""Train the built-in demo models on the shapes set and write them into upop/demo_models/.

    python scripts/train_demos.py [demo-blip demo-clip demo-vit demo-blip-nlvr demo-smolvlm] [--epochs N] [--out DIR]
"""

import argparse

from upop.models.demo import DEMOS, train_demo

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("names", nargs="*", default=list(DEMOS))
ap.add_argument("--epochs", type=int, default=None)
ap.add_argument("--out", default=None, help="folder to write into (default: the package's demo_models/)")
ap.add_argument("--init-from", default=None, help="continue training from this demo folder (one name only)")
ap.add_argument("--lr", type=float, default=None)
args = ap.parse_args()
for name in args.names:
    out = f"{args.out}/{name}" if args.out else None
    train_demo(name, out_dir=out, epochs=args.epochs, init_from=args.init_from, lr=args.lr)
