"""Validation accuracy of a trained run under several test-time-augmentation view sets.

    python benchmarks/tta_views.py RUN_DIR [RUN_DIR ...]

RUN_DIR is the --out folder of an `imgclf train ... --val-split F` run; its own validation split is rebuilt.
Each view (a shift of up to 2 pixels, flipped or not) is predicted once, then the sets average their views;
the last rows give the 50 views only to the images whose centre view and its flip leave the top two classes
closer than a recipe's tta_margin, and how many images that is.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from imgclf.evaluate import load_run_dataset, predict_logits, tta_shifts, tta_views  # noqa: E402
from imgclf.runs import load_model  # noqa: E402

MAX_SHIFT = 2  # pixels
FLIPS = (False, True)
GATE_MARGINS = (0.3, 0.45, 0.6, 0.75)  # probability between the top two classes
SHIFT_SETS = {  # name: the (dy, dx) shifts of a view set; all but the last are imgclf's own
    "centre": tta_shifts([]),
    "centre + diagonal 1-pixel shifts (airbench, tta_shift unset)": tta_shifts(["crop"]),
    "3x3 shifts (tta_shift: 1)": tta_shifts(["crop"], 1),
    "5x5 shifts (tta_shift: 2)": tta_shifts(["crop"], 2),
    "diagonal shifts up to 2": [(d, d) for d in range(-2, 3)],
}


def view_accuracies(run_dir: str) -> dict[str, float]:
    model = load_model(run_dir)
    val = load_run_dataset(model, Path(run_dir), None, None).split("val")
    precision = model.info.get("precision", "fp32")
    views = tta_views(val.images.float(), ["crop", "flip"], shift=MAX_SHIFT)  # each shift, then its flip
    keys = [(dy, dx, flip) for dy, dx in tta_shifts(["crop"], MAX_SHIFT) for flip in FLIPS]
    logits = {key: predict_logits(model.net, view.to(torch.uint8), model.mean, model.std, precision=precision)
              for key, view in zip(keys, views, strict=True)}
    results = {}
    for name, shifts in SHIFT_SETS.items():
        for flips in ((False,), FLIPS):
            mean = torch.stack([logits[dy, dx, f] for dy, dx in shifts for f in flips]).mean(0)
            label = f"{name}{' x flip' if len(flips) == 2 else ''} ({len(shifts) * len(flips)} views)"
            results[label] = (mean.argmax(1) == val.labels).float().mean().item() * 100
    # A recipe's tta_margin: the centre and its flip, and for images they leave unsure, all 50 views.
    cheap = (logits[0, 0, False] + logits[0, 0, True]) / 2
    every = torch.stack(list(logits.values())).mean(0)
    top2 = cheap.softmax(1).topk(2, dim=1).values
    for margin in GATE_MARGINS:
        unsure = top2[:, 0] - top2[:, 1] < margin
        gated = torch.where(unsure[:, None], every, cheap)
        results[f"5x5 shifts x flip for images under tta_margin {margin}"] = (
            (gated.argmax(1) == val.labels).float().mean().item() * 100)
        results[f"  % of images under tta_margin {margin}"] = unsure.float().mean().item() * 100
        results[f"  images predicted otherwise than by all 50 views, tta_margin {margin}"] = (
            (gated.argmax(1) != every.argmax(1)).sum().item())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders trained with a validation split")
    args = parser.parse_args()
    table = {run: view_accuracies(run) for run in args.runs}
    names = list(next(iter(table.values())))
    print("| view set | " + " | ".join(args.runs) + " | mean |")
    print("| --- |" + " --- |" * (len(args.runs) + 1))
    for name in names:
        values = [table[run][name] for run in args.runs]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {sum(values) / len(values):.2f} |")


if __name__ == "__main__":
    main()
