"""imgclf: train, tune, evaluate and compare image classifiers, fast, on a laptop CPU or a GPU.

The Python API:
    load_dataset(name, ...)          -> Dataset (uint8 tensors, class names, normalization)
    create_model(name, ...)          -> torch.nn.Module from the model registry
    train(dataset=..., model=..., ...) -> TrainResult (a run folder with the trained model)
    evaluate(run_dir, ...)           -> dict of metrics
    predict(run_dir, image_paths)    -> top-k (class name, probability) per image
    load_model(run_dir)              -> TrainedModel (net, class names, normalization)
    export_onnx(run_dir)             -> ExportResult (RUN/model.onnx, checked against onnxruntime)
"""

__version__ = "0.1.0"

from imgclf.data import load_dataset  # noqa: E402
from imgclf.evaluate import evaluate, predict  # noqa: E402
from imgclf.export import export_onnx  # noqa: E402
from imgclf.models import create_model  # noqa: E402
from imgclf.runs import load_model  # noqa: E402
from imgclf.train import train  # noqa: E402

__all__ = ["load_dataset", "create_model", "train", "evaluate", "predict", "load_model", "export_onnx", "__version__"]
