"""Validation accuracy of a recipe's runs alone and of their ensemble (softmax averaged), all on one split.

    python benchmarks/ensemble_val.py --recipe fashion-fast [--dataset D] [--seeds 0,1] [--val-split 0.1] [--epochs N]

Every run holds out the split of the first seed (imgclf's --seed also picks the split, so separate `imgclf
train` runs would each be scored on their own images); each trains with its own seed, with the recipe's TTA.
Runs go to a temporary folder and are deleted. A question for a recipe: would two nets in the time budget beat
one?
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from imgclf import load_dataset, train  # noqa: E402
from imgclf.config import load_recipe  # noqa: E402
from imgclf.evaluate import evaluate_with_logits  # noqa: E402
from imgclf.runs import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--dataset", help="a dataset name or image folder (default: the recipe's)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated training seeds; the first picks the split")
    parser.add_argument("--val-split", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, help="instead of the recipe's (a quick check of this script)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    data = load_dataset(args.dataset or load_recipe(args.recipe).data.dataset, val_split=args.val_split,
                        seed=seeds[0])
    probabilities, labels = [], None
    with tempfile.TemporaryDirectory() as runs:
        for seed in seeds:
            started = time.perf_counter()
            out = Path(runs) / f"seed{seed}"
            epochs = {"epochs": args.epochs} if args.epochs else {}
            train(recipe=args.recipe, dataset=data, seed=seed, out=out, quiet=True, **epochs)
            metrics, logits, labels = evaluate_with_logits(load_model(out), data, "val")
            probabilities.append(logits.softmax(1))
            print(f"seed {seed}: {metrics['accuracy']:.2%} val, {time.perf_counter() - started:.0f} s", flush=True)
    ensemble = (sum(probabilities).argmax(1) == labels).float().mean().item()
    print(f"ensemble of {len(seeds)}: {ensemble:.2%} val")


if __name__ == "__main__":
    main()
