"""ONNX export of a trained run: one self-describing file for onnxruntime, OpenCV, ONNX Runtime Web and others.

The graph takes what `imgclf predict` feeds the net, uint8 images (N, C, H, W) at the run's input shape, and
returns float32 logits (N, classes). The run's normalization, and with TTA its averaged views, are inside the
graph, so a caller only decodes and resizes. The class names and the input shape are in the model's metadata.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgclf import __version__
from imgclf.data import dataset_label
from imgclf.errors import ImgclfError, quieter_loggers
from imgclf.evaluate import as_model, prediction_options, tta_view_count, tta_views
from imgclf.loader import normalize
from imgclf.runs import atomic_write, outside_datasets

# The export is checked on a batch of random images against PyTorch, and refused beyond this difference of
# logits, relative to their largest magnitude (float32 kernels differ by about 1e-7 in practice).
MAX_RELATIVE_DIFFERENCE = 1e-4
CHECK_BATCH = 3  # not the traced batch size of 2, so the check also proves the batch dimension is dynamic


class DeployableNet(nn.Module):
    """uint8 images -> logits: the run's normalization and (optionally) its TTA views around its net."""

    def __init__(self, net: nn.Module, mean, std, tta_augment: list[str] | None = None,
                 tta_shift: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.tta_augment, self.tta_shift = tta_augment, tta_shift

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(images, self.mean, self.std)
        if self.tta_augment is None:
            return self.net(x)
        views = list(tta_views(x, self.tta_augment, self.tta_shift))
        logits = self.net(torch.cat(views))  # one batch of all views: fewer, larger kernels for the runtime
        return logits.view(len(views), -1, logits.shape[-1]).mean(0)


@dataclass
class ExportResult:
    path: Path
    tta: bool
    views: int  # averaged inside the graph: 1 without TTA
    max_difference: float  # largest |onnxruntime - PyTorch float32| logit on the check images
    num_bytes: int
    run_precision: str  # what `imgclf predict` computes in (bf16 runs differ from the float32 graph slightly)


def _import_onnx():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError as e:
        raise ImgclfError(f"ONNX export needs the {e.name} package: pip install onnx onnxscript onnxruntime "
                          "(or the imgclf[onnx] extra)") from None
    return onnx, onnxruntime


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter and the onnxscript it drives log notes on torchvision ops, deprecations and each of their
    passes (dozens of INFO lines in a notebook that logs INFO) that say nothing about this model."""
    with quieter_loggers(logging.ERROR, "torch.onnx", "onnxscript", "onnx_ir"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_onnx(run_or_model, out: str | Path | None = None, *, tta: bool | None = None) -> ExportResult:
    """Write RUN/model.onnx (or `out`), checked against PyTorch with onnxruntime before it is written.

    `tta=None` uses the run's recipe setting, as `imgclf evaluate` and `imgclf predict` do.
    """
    onnx, onnxruntime = _import_onnx()
    model, run_dir = as_model(run_or_model)
    if out is not None and not isinstance(out, str | os.PathLike):
        raise ImgclfError(f"out is where to write the .onnx file, a path such as 'model.onnx', not {out!r}")
    if out is None:
        if run_dir is None:
            raise ImgclfError("give `out`: where to write the .onnx file of a model that was not loaded from a run")
        out = run_dir / "model.onnx"
    if Path(out).is_dir() or str(out).endswith(("/", os.sep)):  # a folder, as for cp: the file goes inside it
        out = Path(out) / "model.onnx"
    out = Path(out)
    outside_datasets(out.parent, "the ONNX file", model.info.get("dataset"))
    another_run = ((out.parent / "model.json").exists() or (out.parent / "checkpoint.pt").exists()) and (
        run_dir is None or out.parent.resolve() != run_dir.resolve())
    if out.name.lower() == "model.onnx" and another_run:
        # there it would pass for that run's own export (and train removes it as such on a resume)
        raise ImgclfError(f"{out.parent} holds a training run whose model.onnx this would pass for; give --out another "
                          "file name or folder (a model loaded from that run: export the run folder itself)")
    if out.suffix.lower() != ".onnx":  # an existing photo or notes file would be overwritten; a new m.txt misnamed
        raise ImgclfError(f"{out} is not an .onnx file name; give --out a path ending in .onnx, or a folder "
                          "ending in / (nothing was written)")
    tta, options = prediction_options(model, tta)
    # prediction_options turns TTA off for a run trained without flips or crops: only the image itself.
    views = tta_view_count(options["tta_augment"], options["tta_shift"]) if tta else 1
    # A copy: a model loaded on a GPU (or in bf16) stays as its caller has it.
    net = copy.deepcopy(model.net).float().to(memory_format=torch.contiguous_format).cpu().eval()
    deployable = DeployableNet(net, model.mean, model.std, options.get("tta_augment"), options.get("tta_shift"))
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (2, *model.input_shape), dtype=torch.uint8, generator=generator)
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(deployable, (example,), dynamo=True, input_names=["images"],
                                        output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        verbose=False, report=False)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ImgclfError(f"the ONNX exporter failed on this model ({type(e).__name__}: {first}); "
                          "please report it with the run's model.json") from None
    proto = program.model_proto
    arch, run_precision = model.info.get("architecture", {}), str(model.info.get("precision", "fp32"))
    onnx.helper.set_model_props(proto, {
        "imgclf_version": __version__,
        "class_names": json.dumps(model.class_names),
        "input": f"images: uint8 (N, {', '.join(map(str, model.input_shape))}), N any, channels in RGB order (not "
                 f"OpenCV's BGR) or one gray channel; output logits: float32 "
                 f"(N, {model.num_classes}), softmax gives probabilities",
        "input_shape": json.dumps(list(model.input_shape)),
        "architecture": json.dumps(arch),
        "dataset": dataset_label(model.info.get("dataset")) or "",  # a shipped file keeps no local path
        "tta": json.dumps(tta),
        "tta_views": json.dumps(views),
        "run_precision": run_precision,  # the graph itself computes in float32
    })
    data = proto.SerializeToString()

    check = torch.randint(0, 256, (CHECK_BATCH, *model.input_shape), dtype=torch.uint8, generator=generator)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": check.numpy()})[0]
    with torch.no_grad():
        expected = deployable(check).numpy()
    difference = float(np.abs(got - expected).max())
    limit = MAX_RELATIVE_DIFFERENCE * max(1.0, float(np.abs(expected).max()))
    if got.shape != expected.shape or not difference <= limit:  # "not <=": a NaN difference fails too
        raise ImgclfError(f"the exported graph's logits differ from PyTorch's by {difference:.3g}, so {out} was not "
                          "written; please report it with the run's model.json")
    try:
        atomic_write(out, data)
    except OSError as e:
        raise ImgclfError(f"cannot write {out} ({e.strerror or e}); choose another --out") from None
    return ExportResult(path=out, tta=tta, views=views, max_difference=difference,
                        num_bytes=len(data), run_precision=run_precision)
