"""Validation accuracy of a trained run with its batch-norm statistics as trained and re-estimated afterwards.

    python benchmarks/bn_recalibration.py RUN_DIR [RUN_DIR ...]

RUN_DIR is the --out folder of an `imgclf train ... --val-split F` run; its own validation split is rebuilt.
Training leaves running statistics that weigh the last augmented batches most (fastnet's momentum 0.6); here
they are re-estimated as plain averages over every training image (unaugmented, or half of them flipped), then
the validation split is scored with the run's own TTA, as `imgclf evaluate RUN --split val` does.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from imgclf.device import autocast, memory_format, prediction_precision  # noqa: E402
from imgclf.evaluate import evaluate_with_logits, load_run_dataset  # noqa: E402
from imgclf.loader import normalize  # noqa: E402
from imgclf.runs import load_model  # noqa: E402

BATCH = 1000  # images per forward pass while re-estimating


def recalibrate(run_dir: str, images: torch.Tensor, flip_half: bool):
    """The run's model with every batch norm's running statistics re-estimated over `images`."""
    model = load_model(run_dir)
    norms = [m for m in model.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over all the batches
    # As evaluate_with_logits scores it: the run's precision where this CPU has it fast, else fp32.
    precision = prediction_precision(model.info.get("precision", "fp32"), torch.device("cpu"))
    mean, std = torch.tensor(model.mean), torch.tensor(model.std)
    flips = torch.Generator().manual_seed(0)
    model.net.train()
    with torch.no_grad(), autocast(torch.device("cpu"), precision):
        for start in range(0, len(images), BATCH):
            x = images[start:start + BATCH]
            if flip_half:
                x = torch.where(torch.rand(len(x), 1, 1, 1, generator=flips) < 0.5, x.flip(3), x)
            model.net(normalize(x, mean, std).contiguous(memory_format=memory_format(model.net, precision)))
    model.net.eval()
    return model, len(norms)


def accuracies(run_dir: str) -> dict[str, float]:
    model = load_model(run_dir)
    data = load_run_dataset(model, Path(run_dir))
    results = {"as trained": evaluate_with_logits(model, data, "val")[0]["accuracy"] * 100}
    for name, flip_half in (("re-estimated on the training images", False),
                            ("re-estimated on the training images, half flipped", True)):
        recalibrated, norms = recalibrate(run_dir, data.train.images, flip_half)
        if not norms:
            raise SystemExit(f"error: {run_dir}'s model has no batch norm to re-estimate")
        results[name] = evaluate_with_logits(recalibrated, data, "val")[0]["accuracy"] * 100
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders trained with a validation split")
    args = parser.parse_args()
    table = {run: accuracies(run) for run in args.runs}
    print("| batch-norm statistics | " + " | ".join(args.runs) + " |")
    print("| --- |" + " --- |" * len(args.runs))
    for name in next(iter(table.values())):
        print(f"| {name} | " + " | ".join(f"{table[run][name]:.2f}" for run in args.runs) + " |")


if __name__ == "__main__":
    main()
