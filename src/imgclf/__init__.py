"""imgclf: train, tune, evaluate and compare image classifiers, fast, on a laptop CPU or a GPU.

The Python API:
    load_dataset(name, ...)          -> Dataset (uint8 tensors, class names, normalization)
    create_model(name, ...)          -> torch.nn.Module from the model registry
    model_summary(model, recipe, dataset) -> ModelSummary (Keras-style: layers, output shapes, params; .table())
    train(dataset=..., model=..., ...) -> TrainResult (a run folder with the trained model)
    evaluate(run_dir, ...)           -> dict of metrics
    predict(run_dir, image_paths)    -> top-k (class name, probability) per image
    predict_files(run_dir, paths)    -> (the files predicted, their top-k): a folder's undecodable files are skipped
    load_model(run_dir)              -> TrainedModel (net, class names, normalization)
    export_onnx(run_dir)             -> ExportResult (RUN/model.onnx, checked against onnxruntime)
    write_report(run_dir)            -> Path of RUN/report.html (figures inside)
    compare_runs(run_dirs, out_dir)  -> one row of metrics per run; writes a table, charts and an HTML page
    tune(dataset, space, ...)        -> TuneResult (an Optuna study, trials.csv, best.yaml)
    ImgclfError                      the exception of every problem the user can fix (its message says how)
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# Imported on first use (PEP 562), so `imgclf --help` and one-line errors need not load torch and scikit-learn.
_API = {"load_dataset": "imgclf.data", "create_model": "imgclf.models", "model_summary": "imgclf.models",
        "train": "imgclf.train",
        "evaluate": "imgclf.evaluate", "predict": "imgclf.evaluate",
        "predict_files": "imgclf.evaluate", "load_model": "imgclf.runs",
        "export_onnx": "imgclf.export", "write_report": "imgclf.report", "compare_runs": "imgclf.report",
        "tune": "imgclf.tune", "ImgclfError": "imgclf.errors"}

__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'imgclf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    """Importing the module imgclf.train sets the package's `train` attribute to that module; keep the names of
    the API (train, evaluate) meaning the functions, as they did when this file imported them eagerly."""

    def __setattr__(self, name: str, value) -> None:
        if not (name in _API and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
