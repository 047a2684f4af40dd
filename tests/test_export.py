"""ONNX export: every registered model exports, and onnxruntime gives the logits PyTorch gives."""

import json
import os

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from imgclf.errors import ImgclfError
from imgclf.evaluate import predict_logits
from imgclf.export import export_onnx
from imgclf.models import MODELS, create_model
from imgclf.runs import load_model, save_model


def saved_run(path, name, channels=3, size=32, **info):
    torch.manual_seed(0)
    net = create_model(name, num_classes=4, in_channels=channels, image_size=size)
    with torch.no_grad():  # move batch-norm statistics off their initial values, so their export is checked
        net.train()(torch.randn(8, channels, size, size))
    save_model(path, net.eval(), ["a", "b", "c", "d"], [0.5] * channels, [0.25] * channels, (channels, size, size),
               dataset="synthetic", **info)
    return path


def run_onnx(path, images: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_exports_and_matches_pytorch(name, tmp_path):
    run = saved_run(tmp_path / name, name)
    result = export_onnx(run)
    assert result.path == run / "model.onnx" and not result.tta
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    model = load_model(run)
    expected = predict_logits(model.net, images, model.mean, model.std).numpy()
    np.testing.assert_allclose(run_onnx(result.path, images), expected, rtol=1e-4, atol=1e-5)


def test_metadata_and_tta_follow_the_run(tmp_path):
    run = saved_run(tmp_path / "run", "lenet", 1, 28, augment=["crop", "flip"], tta=True)
    result = export_onnx(run)
    assert result.tta and result.views == 6  # three shifts, each also flipped
    meta = {p.key: p.value for p in onnx.load(result.path).metadata_props}
    assert json.loads(meta["class_names"]) == ["a", "b", "c", "d"] and json.loads(meta["input_shape"]) == [1, 28, 28]
    assert json.loads(meta["tta"]) is True and meta["dataset"] == "synthetic"
    info = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps(info | {"dataset": "/home/me/private/photos"}))
    meta = {p.key: p.value for p in onnx.load(export_onnx(run, tmp_path / "shipped.onnx").path).metadata_props}
    assert meta["dataset"] == "photos"  # a file to ship keeps the folder's name, not where it is

    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    model = load_model(run)
    with_tta = predict_logits(model.net, images, model.mean, model.std, tta_augment=["crop", "flip"]).numpy()
    np.testing.assert_allclose(run_onnx(result.path, images), with_tta, rtol=1e-4, atol=1e-5)
    plain = export_onnx(run, tmp_path / "plain.onnx", tta=False)
    without = predict_logits(model.net, images, model.mean, model.std).numpy()
    np.testing.assert_allclose(run_onnx(plain.path, images), without, rtol=1e-4, atol=1e-5)
    assert not np.allclose(with_tta, without)


def test_bad_targets_are_one_line_errors(tmp_path):
    with pytest.raises(ImgclfError, match="no trained model"):
        export_onnx(tmp_path)
    run = saved_run(tmp_path / "run", "mlp", 1, 8)
    assert export_onnx(run, tmp_path).path == tmp_path / "model.onnx"  # a folder, as for cp
    assert export_onnx(run, f"{tmp_path}/new/").path == tmp_path / "new" / "model.onnx"
    (tmp_path / "photo.png").write_bytes(b"mine")
    with pytest.raises(ImgclfError, match="is not an .onnx file name"):
        export_onnx(run, tmp_path / "photo.png")
    assert (tmp_path / "photo.png").read_bytes() == b"mine"
    with pytest.raises(ImgclfError, match="is not an .onnx file name"):
        export_onnx(run, tmp_path / "m.txt")
    assert not (tmp_path / "m.txt").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ImgclfError, match="afile is a file, not a folder, so .* cannot be written there"):
        export_onnx(run, tmp_path / "afile" / "model.onnx")
    with pytest.raises(ImgclfError, match="out is where to write the .onnx file"):
        export_onnx(run, 5)
    other = saved_run(tmp_path / "other", "mlp", 1, 8)  # another run's folder
    with pytest.raises(ImgclfError, match="other holds a training run whose model.onnx this would pass for"):
        export_onnx(run, other)
    assert not (other / "model.onnx").exists()
    assert export_onnx(run, other / "from-run.onnx").path.exists()  # a name of its own passes for nothing
    assert export_onnx(load_model(run), run / "loaded.onnx").path.exists()
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "config.yaml").write_text("mine: 1")  # not a run
    assert export_onnx(run, tmp_path / "project").path.exists()
    assert export_onnx(run, tmp_path / "UPPER.ONNX").path.exists()
    (tmp_path / "readonly").mkdir(mode=0o555)
    if os.geteuid() != 0:  # root writes anyway
        with pytest.raises(ImgclfError, match="cannot write"):
            export_onnx(run, tmp_path / "readonly" / "model.onnx")


def test_tta_without_views_is_plain_and_the_run_precision_is_recorded(tmp_path):
    run = saved_run(tmp_path / "run", "mlp", 1, 8, augment=[], tta=True, precision="bf16")
    result = export_onnx(run)
    assert not result.tta and result.views == 1 and result.run_precision == "bf16"
    meta = {p.key: p.value for p in onnx.load(result.path).metadata_props}
    assert meta["run_precision"] == "bf16" and meta["tta_views"] == "1"
