import errno
import gzip
import hashlib
import http.server
import io
import os
import pickle
import re
import shutil
import socket
import struct
import tarfile
import threading
import time
import unicodedata
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import imgclf
from imgclf import data
from imgclf.cli import main
from imgclf.data import DATASETS, dataset_info, list_datasets, load_dataset
from imgclf.errors import ImgclfError

REAL_DATA = Path("/work/shared/datasets")


# ---- writers for small files in the canonical formats ----

def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes())


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def trust(monkeypatch, name: str, folder: Path) -> None:
    """Point the canonical md5s at the test files, as if they were the real ones."""
    files = {f: md5(folder / f) for f in DATASETS[name]["files"]}
    monkeypatch.setitem(DATASETS[name], "files", files)


def make_mnist(folder: Path, n_train: int = 50, n_test: int = 20) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images, 0x803)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x801)
        arrays[split] = images, labels
    return arrays


@pytest.fixture
def mnist(tmp_path, monkeypatch):
    root = tmp_path / "data"
    arrays = make_mnist(root / "mnist")
    trust(monkeypatch, "mnist", root / "mnist")
    monkeypatch.setenv("IMGCLF_DATA", str(root))
    return root, arrays


def cifar_batch(n: int, label_key: str, num_classes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return {"data": images, label_key: [i % num_classes for i in range(n)]}


def as_py2(d: dict) -> dict:
    """Byte-string keys and names, as in the original Python 2 pickles."""
    return {k.encode(): [n.encode() for n in v] if k.endswith("names") else v for k, v in d.items()}


def py2_pickle(d: dict) -> bytes:
    """The bytes Python 2's cPickle writes for a CIFAR dict: byte strings, numpy.core globals, protocol 2."""
    def string(b: bytes) -> bytes:
        return b"T" + struct.pack("<I", len(b)) + b

    def value(v) -> bytes:
        if isinstance(v, np.ndarray):
            shape = b"".join(b"J" + struct.pack("<i", n) for n in v.shape) + b"\x86"  # a 2-tuple
            dtype = (b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R(K\x03" + string(b"|")
                     + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
            return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b")
                    + b"\x87R(K\x01" + shape + dtype + b"\x89" + string(v.tobytes()) + b"tb")
        if isinstance(v, list):
            return b"](" + b"".join(value(x) for x in v) + b"e"
        return b"J" + struct.pack("<i", v) if isinstance(v, int) else string(v.encode())

    return b"\x80\x02}(" + b"".join(string(k.encode()) + value(v) for k, v in d.items()) + b"u."


def make_cifar10(folder: Path, style: str = "py3") -> dict[str, dict]:
    base = folder / "cifar-10-batches-py"
    base.mkdir(parents=True)
    batches = {f"data_batch_{i}": cifar_batch(20, "labels", 10, seed=i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(30, "labels", 10, seed=9)
    batches["batches.meta"] = {"label_names": DATASETS["cifar10"]["classes"], "num_vis": 3072}
    write = {"py3": partial(pickle.dumps, protocol=5), "py2": py2_pickle,
             "bytes-keys": lambda d: pickle.dumps(as_py2(d), protocol=2)}[style]
    for name, d in batches.items():
        (base / name).write_bytes(write(d))
    return batches


def make_cifar100(folder: Path) -> dict[str, dict]:
    base = folder / "cifar-100-python"
    base.mkdir(parents=True)
    files = {s: cifar_batch(n, "fine_labels", 100, seed=n) for s, n in (("train", 400), ("test", 100))}
    for d in files.values():
        d["coarse_labels"] = [label // 5 for label in d["fine_labels"]]
    files["meta"] = {"fine_label_names": DATASETS["cifar100"]["classes"],
                     "coarse_label_names": DATASETS["cifar100-coarse"]["classes"]}
    for name, d in files.items():
        (base / name).write_bytes(pickle.dumps(d))
    return files


def make_image(path: Path, size=(12, 12), mode="RGB", color=(200, 30, 10), fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode != "L" else color[0]).save(path, fmt)


def make_folder(root: Path, splits=("train", "test")) -> None:
    """12 readable images per class and split in mixed sizes, modes and formats; the first split also has
    a junk text file and a corrupt PNG. splits=("",) makes a root of class folders only."""
    for split in splits:
        base = root / split
        for i in range(10):
            make_image(base / "cat" / f"{i}.png", color=(10 * i, 0, 0))
            make_image(base / "dog" / f"{i}.jpg", mode="L", color=(100 + i, 0, 0))
        make_image(base / "dog" / "big.bmp", size=(40, 30))
        make_image(base / "dog" / "small.gif", size=(6, 6))
        make_image(base / "cat" / "gray.webp", mode="L", fmt="WEBP")
        make_image(base / "cat" / "alpha.png", mode="RGBA", color=(1, 2, 3, 4))
    base = root / splits[0]
    (base / "cat" / "notes.txt").write_text("not an image")
    (base / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")


# ---- named datasets ----

def test_data_root(monkeypatch, tmp_path):
    monkeypatch.delenv("IMGCLF_DATA", raising=False)
    assert data.data_root() == Path.home() / ".cache" / "imgclf"
    monkeypatch.setenv("IMGCLF_DATA", str(tmp_path))
    assert data.data_root() == tmp_path
    assert data.data_root(tmp_path / "x") == tmp_path / "x"


def test_mnist_parses(mnist):
    _, arrays = mnist
    d = load_dataset("mnist", val_split=0)
    assert d.class_names == [str(i) for i in range(10)] and d.val is None
    assert d.train.images.shape == (50, 1, 28, 28) and d.train.images.dtype == torch.uint8
    assert d.train.labels.dtype == torch.int64 and d.train.images.is_contiguous()
    assert torch.equal(d.train.images[:, 0], torch.from_numpy(arrays["train"][0]))
    assert torch.equal(d.test.labels, torch.from_numpy(arrays["test"][1]))
    assert (d.num_classes, d.in_channels, d.image_size, d.image_shape) == (10, 1, 28, (1, 28, 28))
    pixels = arrays["train"][0] / 255
    assert d.mean[0] == pytest.approx(pixels.mean()) and d.std[0] == pytest.approx(pixels.std())


def test_val_split_is_stratified_and_seeded(mnist):
    a = load_dataset("mnist", val_split=0.2, seed=1)
    b = load_dataset("mnist", val_split=0.2, seed=1)
    c = load_dataset("mnist", val_split=0.2, seed=2)
    assert (len(a.train), len(a.val), len(a.test)) == (40, 10, 20)
    assert a.class_counts()["val"] == [1] * 10 and a.class_counts()["train"] == [4] * 10
    assert torch.equal(a.val.images, b.val.images) and not torch.equal(a.val.images, c.val.images)
    assert {tuple(x.flatten()[:8].tolist()) for x in torch.cat([a.train.images, a.val.images])} == {
        tuple(x.flatten()[:8].tolist()) for x in torch.from_numpy(mnist[1]["train"][0])}


def test_subset_is_stratified(mnist):
    d = load_dataset("mnist", val_split=0, subset=20, seed=3)
    assert d.class_counts()["train"] == [2] * 10
    with pytest.warns(UserWarning, match="training on all of them"):
        assert len(load_dataset("mnist", val_split=0, subset=10_000).train) == 50
    with pytest.raises(ImgclfError, match="fewer than the 10 classes"):
        load_dataset("mnist", subset=5)


def test_bad_arguments(mnist):
    with pytest.raises(ImgclfError, match="val_split"):
        load_dataset("mnist", val_split=1.0)
    with pytest.raises(ImgclfError, match="unknown dataset 'nope'.*mnist, fashion-mnist"):
        load_dataset("nope")


def test_split_access_and_summary(mnist):
    d = load_dataset("mnist", val_split=0)
    assert d.split("test") is d.test
    with pytest.raises(ImgclfError, match="mnist has no val split; use --split test;"):
        d.split("val")
    with pytest.raises(ImgclfError, match="unknown split"):
        d.split("dev")
    text = d.summary()
    assert "mnist: 10 classes, 1x28x28" in text and "train 50, test 20" in text
    assert len(text.splitlines()) == 3 + 10


def test_resize_and_channels_for_named_datasets(mnist):
    d = load_dataset("mnist", val_split=0, image_size=32, channels=3)
    assert d.train.images.shape == (50, 3, 32, 32) and d.test.images.shape == (20, 3, 32, 32)
    assert torch.equal(d.train.images[:, 0], d.train.images[:, 2]) and len(d.mean) == 3


@pytest.mark.parametrize("damage, message", [
    (lambda p: write_idx(p, np.zeros((5, 28, 28)), 0x801), "not an IDX file"),
    (lambda p: p.write_bytes(p.read_bytes()[:200]), "not a readable gzip"),
    (lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-10])), "header"),
    (lambda p: p.write_bytes(b"hello"), "not a readable gzip"),
])
def test_corrupt_idx_names_the_file(mnist, monkeypatch, damage, message):
    root, _ = mnist
    path = root / "mnist" / "train-images-idx3-ubyte.gz"
    damage(path)
    trust(monkeypatch, "mnist", root / "mnist")
    with pytest.raises(ImgclfError, match=message) as e:
        load_dataset("mnist")
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_md5_mismatch_is_reported_and_file_kept(mnist):
    root, _ = mnist
    path = root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    write_idx(path, np.ones(20), 0x801)
    with pytest.raises(ImgclfError, match=re.escape(f"{path} failed its md5 check")):
        load_dataset("mnist")
    assert path.exists()


def test_missing_files_without_download(tmp_path):
    where = re.escape(f"missing from {tmp_path / 'mnist'}")
    with pytest.raises(ImgclfError, match=where + ".*--data-dir.*IMGCLF_DATA"):
        load_dataset("mnist", tmp_path, download=False)


@pytest.mark.parametrize("style", ["py3", "bytes-keys", "py2"])
def test_cifar10(tmp_path, monkeypatch, style):
    written = make_cifar10(tmp_path / "cifar10", style)
    trust(monkeypatch, "cifar10", tmp_path / "cifar10")
    d = load_dataset("cifar10", tmp_path, val_split=0)
    assert d.class_names[0] == "airplane" and d.train.images.shape == (100, 3, 32, 32)
    assert d.test.images.shape == (30, 3, 32, 32)
    first = written["data_batch_1"]
    assert torch.equal(d.train.images[0].flatten(), torch.from_numpy(first["data"][0]))
    assert d.train.labels[:20].tolist() == first["labels"]


def test_cifar100_fine_and_coarse(tmp_path, monkeypatch):
    written = make_cifar100(tmp_path / "cifar100")
    trust(monkeypatch, "cifar100", tmp_path / "cifar100")
    trust(monkeypatch, "cifar100-coarse", tmp_path / "cifar100")
    fine = load_dataset("cifar100", tmp_path, val_split=0)
    coarse = load_dataset("cifar100-coarse", tmp_path, val_split=0)
    assert fine.num_classes == 100 and coarse.num_classes == 20 and coarse.class_names[0] == "aquatic_mammals"
    assert fine.train.labels.tolist() == written["train"]["fine_labels"]
    assert coarse.train.labels.tolist() == written["train"]["coarse_labels"]
    assert torch.equal(fine.train.images, coarse.train.images)


def test_grayscale_uses_luma(tmp_path, monkeypatch):
    make_cifar10(tmp_path / "cifar10")
    trust(monkeypatch, "cifar10", tmp_path / "cifar10")
    rgb = load_dataset("cifar10", tmp_path, val_split=0)
    gray = load_dataset("cifar10", tmp_path, val_split=0, grayscale=True)
    assert gray.train.images.shape == (100, 1, 32, 32) and len(gray.mean) == 1
    want = (rgb.train.images.double() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).round()
    assert (gray.train.images[:, 0].double() - want).abs().max() <= 1


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    make_cifar10(tmp_path / "cifar10")
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(pickle.dumps({"data": Evil(marker), "labels": []}))
    trust(monkeypatch, "cifar10", tmp_path / "cifar10")
    with pytest.raises(ImgclfError, match=r"refusing to unpickle (posix|os)\.system in .*data_batch_3"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_digits_test_split_is_fixed():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=5)
    assert torch.equal(a.test.images, b.test.images) and len(a.test) == 360
    assert len(a.train) + len(a.val) == 1437 and not torch.equal(a.val.images, b.val.images)
    assert a.image_shape == (1, 8, 8) and a.train.images.max() == 255


# ---- downloads from a local server ----

@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


def test_download_mnist(tmp_path, monkeypatch, server, capsys):
    served, url = server
    make_mnist(served)
    trust(monkeypatch, "mnist", served)
    monkeypatch.setitem(DATASETS["mnist"], "mirrors", [closed_port_url(), url])  # the first mirror is down
    d = load_dataset("mnist", tmp_path / "data", val_split=0)
    assert len(d.train) == 50
    downloaded = sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir())
    assert downloaded == sorted(DATASETS["mnist"]["files"])  # and no temp files
    assert "downloading" in capsys.readouterr().err


def torchvision_file(folder: Path, name: str, state: dict) -> str:
    """`state` saved as torchvision's weights files are: NAME-<the start of its sha256>.pth; returns that name."""
    torch.save(state, folder / "tmp.pth")
    digest = hashlib.sha256((folder / "tmp.pth").read_bytes()).hexdigest()[:8]
    (folder / "tmp.pth").rename(folder / f"{name}-{digest}.pth")
    return f"{name}-{digest}.pth"


def torchvision_vgg_file(folder: Path, name: str, net: torch.nn.Module) -> str:
    """A .pth as torchvision saves a VGG: features.N and classifier.N tensors."""
    state = {f"features.{i}.{key.rsplit('.', 1)[1]}": t.clone() for i, (key, t) in
             enumerate(net.features.state_dict().items())}
    return torchvision_file(folder, name, {**state, "classifier.0.weight": torch.zeros(4, 4)})


def test_imagenet_weights_are_downloaded_once_checked_and_loaded_by_order(tmp_path, monkeypatch, server):
    from imgclf.models import _VGG_LAYOUTS, create_model

    served, url = server
    monkeypatch.setitem(_VGG_LAYOUTS, "vgg11", [8, "M", 16, "M"])  # a small stand-in for the 507 MB file
    source = create_model("vgg", layout="vgg11", batch_norm=True, num_classes=4)
    file = torchvision_vgg_file(served, "vgg11_bn", source)
    monkeypatch.setitem(data.PRETRAINED, "vgg11_bn", url + file)
    monkeypatch.setenv("IMGCLF_DATA", str(tmp_path / "data"))
    gray = create_model("vgg", layout="vgg11", batch_norm=True, in_channels=1, weights="imagenet")
    assert (tmp_path / "data" / "weights" / file).is_file()
    theirs, ours = source.features.state_dict(), gray.features.state_dict()
    assert torch.equal(ours["conv1.weight"], theirs["conv1.weight"].sum(1, keepdim=True))  # RGB filters on gray
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs if k != "conv1.weight")
    (served / file).unlink()  # the second time, the cached file serves
    create_model("vgg", layout="vgg11", batch_norm=True, weights="imagenet")
    (tmp_path / "data" / "weights" / file).write_bytes(b"damaged")
    with pytest.raises(ImgclfError, match=f"{file} failed its sha256 check .* delete it and run again"):
        create_model("vgg", layout="vgg11", batch_norm=True, weights="imagenet")
    monkeypatch.setitem(data.PRETRAINED, "vgg11", closed_port_url() + "vgg11-0123abcd.pth")
    with pytest.raises(ImgclfError, match=r"cannot download the ImageNet weights vgg11-0123abcd.pth .*offline, put"):
        create_model("vgg", layout="vgg11", batch_norm=False, weights="imagenet")
    with pytest.raises(ImgclfError, match="weights: imagenet is for the layouts vgg11, "):
        create_model("vgg", layout=[8, "M"], weights="imagenet")
    (tmp_path / "data" / "weights" / file).unlink()
    (served / "again").mkdir()
    monkeypatch.setitem(data.PRETRAINED, "vgg11_bn", url + "again/" + torchvision_vgg_file(served / "again",
                                                                                          "vgg11_bn", source))
    result = imgclf.train(dataset="digits", model="vgg", model_options={"layout": "vgg11", "weights": "imagenet",
                          "freeze_features": True}, epochs=1, subset=50, out=tmp_path / "run", quiet=True)
    recorded = yaml.safe_load((result.run_dir / "config.yaml").read_text())["model"]["weights"]  # the file used
    assert recorded == str(tmp_path / "data" / "weights" / Path(data.PRETRAINED["vgg11_bn"]).name)


def test_imagenet_resnet18_loads_all_but_its_head_and_a_cifar_stem_keeps_its_own(tmp_path, monkeypatch, server):
    from imgclf.models import create_model

    served, url = server
    source = create_model("resnet18", stem="imagenet", num_classes=4)
    names = {"stem.conv": "conv1", "stem.bn": "bn1"}  # torchvision's names
    state = {names.get(k.rsplit(".", 1)[0], k.rsplit(".", 1)[0]).replace("shortcut", "downsample") + "."
             + k.rsplit(".", 1)[1]: t for k, t in source.state_dict().items() if not k.startswith("fc.")}
    file = torchvision_file(served, "resnet18", {**state, "fc.weight": torch.zeros(1000, 512),
                                                 "fc.bias": torch.zeros(1000)})
    monkeypatch.setitem(data.PRETRAINED, "resnet18", url + file)
    monkeypatch.setenv("IMGCLF_DATA", str(tmp_path / "data"))
    theirs = source.state_dict()
    gray = create_model("resnet18", stem="imagenet", in_channels=1, weights="imagenet").state_dict()
    assert torch.equal(gray["stem.conv.weight"], theirs["stem.conv.weight"].sum(1, keepdim=True))
    assert all(torch.equal(gray[k], t) for k, t in theirs.items() if not k.startswith(("fc.", "stem.conv")))
    torch.manual_seed(0)
    cifar = create_model("resnet18", weights="imagenet").state_dict()  # 3x3 stem: ImageNet's 7x7 filters do not fit
    torch.manual_seed(0)
    assert torch.equal(cifar["stem.conv.weight"], create_model("resnet18").state_dict()["stem.conv.weight"])
    assert torch.equal(cifar["layer4.1.conv2.weight"], theirs["layer4.1.conv2.weight"])
    with pytest.raises(ImgclfError, match="weights: imagenet is for resnet18 of width 64, not 32"):
        create_model("resnet18", width=32, weights="imagenet")
    result = imgclf.train(dataset="digits", model="resnet18", model_options={"weights": "imagenet"}, epochs=1,
                          subset=50, batch_size=25, out=tmp_path / "run", quiet=True)
    again = create_model("resnet18", num_classes=10, in_channels=1, weights=str(result.run_dir / "model.safetensors"))
    assert torch.equal(again.state_dict()["stem.conv.weight"], result.model.state_dict()["stem.conv.weight"])


def test_corrupt_download_leaves_nothing(tmp_path, monkeypatch, server):
    served, url = server
    make_mnist(served)
    trust(monkeypatch, "mnist", served)
    write_idx(served / "train-labels-idx1-ubyte.gz", np.zeros(50), 0x801)  # no longer matches its md5
    monkeypatch.setitem(DATASETS["mnist"], "mirrors", [url])
    with pytest.raises(ImgclfError, match=re.escape(f"{url}train-labels-idx1-ubyte.gz failed its md5 check")):
        load_dataset("mnist", tmp_path)
    left = [p.name for p in (tmp_path / "mnist").iterdir()]
    assert "train-labels-idx1-ubyte.gz" not in left and not [n for n in left if n.endswith(".part")]


def test_a_cut_off_download_is_said_as_such_and_only_the_files_still_missing_are_asked_for(tmp_path, monkeypatch):
    served = tmp_path / "served"
    make_mnist(served)
    trust(monkeypatch, "mnist", served)
    cut = "train-labels-idx1-ubyte.gz"  # the second file to download, after the training images

    class CutsOff(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = (served / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 1000 if self.path.endswith(cut) else len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutsOff)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    monkeypatch.setitem(DATASETS["mnist"], "mirrors", [url])
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    killed = folder / f".{cut}.abc123.part"  # what a download killed earlier left
    killed.write_bytes(b"partial")
    os.utime(killed, (time.time() - 120,) * 2)
    try:
        with pytest.raises(ImgclfError) as e:
            load_dataset("mnist", tmp_path / "data")
    finally:
        httpd.shutdown()
        httpd.server_close()
    message = str(e.value)
    assert f"{url}{cut} was cut off after" in message and "md5" not in message
    hint = message.split("; put ", 1)[1]
    assert cut in hint and "train-images-idx3-ubyte.gz" not in hint  # that one arrived whole
    assert not killed.exists() and not list(folder.glob(".*.part"))


def test_processes_starting_together_download_each_file_once(tmp_path, monkeypatch):
    served = tmp_path / "served"
    make_mnist(served)
    trust(monkeypatch, "mnist", served)
    fetched = []

    class Counts(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            fetched.append(self.path)
            time.sleep(0.05)  # long enough for the other loader to want the same file
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Counts, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setitem(DATASETS["mnist"], "mirrors", [f"http://127.0.0.1:{httpd.server_address[1]}/"])
    sizes = []  # two ranks of --nproc, say (the lock is per open file, so threads stand in for processes)
    loaders = [threading.Thread(target=lambda: sizes.append(len(load_dataset("mnist", tmp_path, val_split=0).train)))
               for _ in range(2)]
    try:
        for loader in loaders:
            loader.start()
        for loader in loaders:
            loader.join()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert sizes == [50, 50] and sorted(fetched) == sorted(f"/{f}" for f in DATASETS["mnist"]["files"])


def test_offline_error_says_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setitem(DATASETS["mnist"], "mirrors", [closed_port_url()])
    with pytest.raises(ImgclfError) as e:
        load_dataset("mnist", tmp_path)
    message = str(e.value)
    assert "could not download" in message and "t10k-labels-idx1-ubyte.gz" in message and "\n" not in message
    assert str(tmp_path / "mnist") in message and "--data-dir" in message and "IMGCLF_DATA" in message
    assert not (tmp_path / "mnist").exists()  # nor the folder it made for them


def make_tarball(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


def test_download_and_extract_cifar10(tmp_path, monkeypatch, server):
    served, url = server
    make_cifar10(tmp_path / "src")
    trust(monkeypatch, "cifar10", tmp_path / "src")
    make_tarball(served / "cifar-10-python.tar.gz",
                 {f: (tmp_path / "src" / f).read_bytes() for f in DATASETS["cifar10"]["files"]})
    monkeypatch.setitem(DATASETS["cifar10"], "mirrors", [url])
    monkeypatch.setitem(DATASETS["cifar10"], "archive", ("cifar-10-python.tar.gz",
                                                         md5(served / "cifar-10-python.tar.gz")))
    killed = tmp_path / "data" / "cifar10" / ".extract-killed" / "cifar-10-batches-py"  # left by a killed extraction
    killed.mkdir(parents=True)
    (killed / "data_batch_1").write_bytes(b"half")
    assert len(load_dataset("cifar10", tmp_path / "data", val_split=0).train) == 100
    assert [p.name for p in (tmp_path / "data" / "cifar10").iterdir() if p.name.startswith(".")] == []


def test_a_local_archive_extracts_offline(tmp_path, monkeypatch):
    make_cifar10(tmp_path / "src")
    trust(monkeypatch, "cifar10", tmp_path / "src")
    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    archive = tmp_path / "data" / "cifar10" / "cifar-10-python.tar.gz"
    make_tarball(archive, {f: (tmp_path / "src" / f).read_bytes() for f in DATASETS["cifar10"]["files"]})
    monkeypatch.setitem(DATASETS["cifar10"], "archive", ("cifar-10-python.tar.gz", md5(archive)))
    assert len(load_dataset("cifar10", tmp_path / "data", val_split=0, download=False).train) == 100


def test_a_disk_that_cannot_take_the_download_is_said_once_and_a_killed_download_is_swept(tmp_path, monkeypatch,
                                                                                            server):
    served, url = server
    make_mnist(served)
    trust(monkeypatch, "mnist", served)
    monkeypatch.setitem(DATASETS["mnist"], "mirrors", [url, url])
    tried = []

    def full(source, target, length=0):
        tried.append(source.url)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data.shutil, "copyfileobj", full)
    with pytest.raises(ImgclfError, match=r"cannot write into .*mnist \(No space left on device\); free some space "
                                          r"there, or point --data-dir"):
        load_dataset("mnist", tmp_path / "full")
    assert len(tried) == 1 and not (tmp_path / "full").exists()  # not the next mirror: the disk is the problem
    monkeypatch.undo()
    trust(monkeypatch, "mnist", served)
    monkeypatch.setitem(DATASETS["mnist"], "mirrors", [url])
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    killed = tmp_path / "data" / "mnist" / ".train-images-idx3-ubyte.gz.abcd1234.part"  # seconds ago, by a kill -9
    killed.write_bytes(b"half")
    load_dataset("mnist", tmp_path / "data")
    assert not killed.exists()
    (tmp_path / "blocked").write_text("a file")
    with pytest.raises(ImgclfError, match=r"blocked is a file, not a folder, so .*blocked/sub/mnist cannot be made"):
        load_dataset("mnist", tmp_path / "blocked" / "sub")


def test_unsafe_tarball_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    make_tarball(folder / "cifar-10-python.tar.gz", {"../escaped": b"x"})
    monkeypatch.setitem(DATASETS["cifar10"], "archive", ("cifar-10-python.tar.gz",
                                                         md5(folder / "cifar-10-python.tar.gz")))
    with pytest.raises(ImgclfError, match="could not extract"):
        load_dataset("cifar10", tmp_path, download=True)
    assert not (tmp_path / "escaped").exists()


# ---- image folders ----

def test_folder_with_splits(tmp_path):
    make_folder(tmp_path / "pets")
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\) that are not readable 8- or 16-bit .*, .*broken\.png"):
        d = load_dataset(str(tmp_path / "pets"), tmp_path / "cache", val_split=0)
    assert d.class_names == ["cat", "dog"] and d.name == str(tmp_path / "pets")
    assert d.train.images.shape == (24, 3, 12, 12) and d.test.images.shape == (24, 3, 12, 12)
    assert d.class_counts() == {"train": [12, 12], "test": [12, 12]}
    assert d.train.images[0, :, 0, 0].tolist() == [0, 0, 0]  # cat/0.png, converted as is
    with pytest.warns(UserWarning):
        gray = load_dataset(str(tmp_path / "pets"), tmp_path / "cache", val_split=0, grayscale=True,
                            image_size=8)
    assert gray.train.images.shape == (24, 1, 8, 8)


def test_folder_all_gray_gives_one_channel_and_union_of_classes(tmp_path):
    make_image(tmp_path / "f" / "train" / "a" / "1.png", mode="L")
    make_image(tmp_path / "f" / "val" / "b" / "1.png", mode="L")
    with pytest.raises(ImgclfError, match=r"class folder b is in .*val but not in .*train"):
        load_dataset(str(tmp_path / "f"), tmp_path / "cache")  # a class seen in val only would never be learnt
    make_image(tmp_path / "f" / "train" / "b" / "2.png", mode="L")
    d = load_dataset(str(tmp_path / "f"), tmp_path / "cache")
    assert d.class_names == ["a", "b"] and d.in_channels == 1
    assert len(d.val) == 1 and d.val.labels.tolist() == [1] and d.test is None


@pytest.mark.parametrize("suffix", [".png", ".tif", ".pgm"])  # PIL opens them as I;16, I;16 and I
def test_16_bit_gray_images_are_scaled_to_8_bits_not_clipped(tmp_path, suffix):
    pixels = np.array([[0, 257 * 100], [257 * 200, 65535]], np.uint16)
    path = tmp_path / f"g16{suffix}"
    Image.fromarray(pixels).save(path)
    assert data.read_image(path, "L", (2, 2))[0].tolist() == [[0, 100], [200, 255]]
    assert data.read_image(path, "RGB", (2, 2))[2].tolist() == [[0, 100], [200, 255]]


def test_transparent_pixels_are_read_on_white_as_viewers_show_them(tmp_path):
    rgba = np.zeros((1, 2, 4), np.uint8)  # a transparent black pixel, then an opaque black one
    rgba[0, 1, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert data.read_image(tmp_path / "rgba.png", "L", (2, 1))[0].tolist() == [[255, 0]]
    palette = Image.new("P", (2, 1))  # a GIF-style palette image whose colour 0 is transparent
    palette.putpalette([0, 0, 0, 200, 30, 10])
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    assert data.read_image(tmp_path / "p.png", "RGB", (2, 1))[:, 0].tolist() == [[255, 200], [255, 30], [255, 10]]


def test_a_constant_channel_is_left_unscaled_not_divided_by_zero(tmp_path):
    for i in range(4):  # red varies, green and blue are 0 everywhere
        make_image(tmp_path / "f" / "train" / "ab"[i % 2] / f"{i}.png", color=(50 * i, 0, 0))
    d = load_dataset(str(tmp_path / "f"), tmp_path / "cache", val_split=0)
    assert d.std[0] > 0 and d.std[1:] == (1.0, 1.0) and d.mean[1:] == (0.0, 0.0)


def test_folder_of_classes_carves_a_fixed_test_split(tmp_path):
    make_folder(tmp_path / "pets", splits=("",))
    with pytest.warns(UserWarning):
        a = load_dataset(str(tmp_path / "pets"), tmp_path / "cache", seed=0, val_split=0.25)
        b = load_dataset(str(tmp_path / "pets"), tmp_path / "cache", seed=7, val_split=0.25)
    assert 0 < len(a.test) < 12 and torch.equal(a.test.images, b.test.images)  # about 20% of the 24 images
    assert len(a.train) + len(a.val) + len(a.test) == 24 and min(a.class_counts()["train"]) > 0
    assert not torch.equal(a.val.images, b.val.images)


def test_adding_images_never_moves_one_between_train_and_test(tmp_path):
    def test_pixels(d) -> set[int]:
        return {int(x) for x in d.test.images[:, 0, 0, 0]}

    for i in range(40):  # each image is told apart by its red value
        make_image(tmp_path / "f" / "ab"[i % 2] / f"{i}.png", color=(i, 0, 0))
    before = load_dataset(str(tmp_path / "f"), tmp_path / "cache", val_split=0)
    for i in range(40, 80):
        make_image(tmp_path / "f" / "ab"[i % 2] / f"{i}.png", color=(i, 0, 0))
    after = load_dataset(str(tmp_path / "f"), tmp_path / "cache", val_split=0)
    assert test_pixels(after) & set(range(40)) == test_pixels(before)  # the old images kept their split
    assert 4 <= len(after.test) <= 28  # about 16 of 80


def test_an_empty_class_folder_is_refused_not_trained_as_a_class_without_images(tmp_path):
    for i in range(4):
        make_image(tmp_path / "f" / "train" / "ab"[i % 2] / f"{i}.png")
    (tmp_path / "f" / "train" / "c").mkdir()
    with pytest.raises(ImgclfError, match=r"class folder c in .*train holds no readable training images"):
        load_dataset(str(tmp_path / "f"), tmp_path / "cache")
    (tmp_path / "f" / "train" / "c").rmdir()  # the same files under another class list: decoded anew
    assert load_dataset(str(tmp_path / "f"), tmp_path / "cache", val_split=0).class_names == ["a", "b"]
    (tmp_path / "f" / "train" / "0").mkdir()
    with pytest.raises(ImgclfError, match=r"class folder 0 in .*train holds"):
        load_dataset(str(tmp_path / "f"), tmp_path / "cache")


def test_a_folder_cache_with_missing_arrays_is_decoded_again(tmp_path):
    for i in range(4):
        make_image(tmp_path / "f" / "ab"[i % 2] / f"{i}.png")
    first = load_dataset(str(tmp_path / "f"), tmp_path / "cache", val_split=0)
    (cache,) = (tmp_path / "cache" / "folder-cache").glob("*.npz")
    np.savez(cache, skipped=np.array([], dtype=str))
    stray = cache.with_name(f".{cache.name}.x1y2.tmp")  # as a kill during an earlier write of the cache left it
    stray.write_bytes(b"half")
    os.utime(stray, (time.time() - 3600, time.time() - 3600))
    again = load_dataset(str(tmp_path / "f"), tmp_path / "cache", val_split=0)
    assert torch.equal(first.train.images, again.train.images)
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # rewritten whole; the stray swept


def test_folder_with_only_test_serves_evaluation(tmp_path):
    make_image(tmp_path / "f" / "test" / "a" / "1.png")
    make_image(tmp_path / "f" / "test" / "b" / "1.png")
    d = load_dataset(str(tmp_path / "f"), tmp_path / "cache", image_size=16)
    assert len(d.train) == 0 and d.val is None and d.split("test").images.shape == (2, 3, 16, 16)
    assert d.image_shape == (3, 16, 16) and d.mean == (0.0, 0.0, 0.0)
    with pytest.raises(ImgclfError, match="has no train split; use --split test"):
        d.split("train")
    assert "mean" not in d.summary()  # no training images to take it from
    whole = load_dataset(str(tmp_path / "f"), tmp_path / "cache", image_size=16)
    make_image(tmp_path / "g" / "test" / "a" / "1.png")
    assert "g: 1 class, 3x12x12" in load_dataset(str(tmp_path / "g"), tmp_path / "cache").summary()
    assert whole.all_as_test().test.labels.tolist() == [0, 1]


def test_folder_without_images(tmp_path):
    (tmp_path / "f" / "a").mkdir(parents=True)
    (tmp_path / "f" / "a" / "x.txt").write_text("x")
    with pytest.raises(ImgclfError, match="no readable images"):
        load_dataset(str(tmp_path / "f"), tmp_path / "cache")
    (tmp_path / "g").mkdir()
    with pytest.raises(ImgclfError, match="no class sub-folders"):
        load_dataset(str(tmp_path / "g"), tmp_path / "cache")


def test_folder_cache_hit_skips_decoding(tmp_path, monkeypatch):
    make_folder(tmp_path / "pets")
    with pytest.warns(UserWarning):
        first = load_dataset(str(tmp_path / "pets"), tmp_path / "cache", val_split=0)
    assert len(list((tmp_path / "cache" / "folder-cache").glob("*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(data, "_decode_image", fail)
    monkeypatch.setattr(data, "read_header", fail)
    with pytest.warns(UserWarning, match="skipped 2"):  # the cache remembers what was skipped
        again = load_dataset(str(tmp_path / "pets"), tmp_path / "cache", val_split=0)
    assert torch.equal(first.train.images, again.train.images)
    assert torch.equal(first.test.labels, again.test.labels)
    make_image(tmp_path / "pets" / "train" / "cat" / "new.png")  # a changed folder is decoded again
    with pytest.raises(AssertionError, match="decoded although cached"):
        load_dataset(str(tmp_path / "pets"), tmp_path / "cache", val_split=0)


def test_folder_decodes_in_worker_processes(tmp_path, monkeypatch):
    make_folder(tmp_path / "pets")
    monkeypatch.setattr(data, "_POOL_MIN_FILES", 0)
    with pytest.warns(UserWarning, match="skipped 2"):
        d = load_dataset(str(tmp_path / "pets"), tmp_path / "cache", val_split=0)
    assert d.train.images.shape == (24, 3, 12, 12)


# ---- metadata ----

def test_dataset_info_and_list(tmp_path, mnist):
    info = dataset_info("fashion-mnist")
    assert (info.num_classes, info.channels, info.image_size, info.train_size) == (10, 1, 28, 60000)
    assert info.class_names[-1] == "Ankle boot" and dataset_info("cifar100-coarse").num_classes == 20
    make_image(tmp_path / "f" / "x" / "1.png")
    folder = dataset_info(str(tmp_path / "f"))
    assert folder.class_names == ["x"] and folder.train_size is None and folder.image_size is None
    with pytest.raises(ImgclfError, match="use one of mnist, fashion-mnist, cifar10"):
        dataset_info("imagenet")
    listed = {d.name: d for d in list_datasets()}
    assert listed["mnist"].present and not listed["cifar10"].present and listed["digits"].present
    assert listed["cifar10"].shape == "3x32x32" and listed["cifar100"].num_classes == 100


def test_a_damaged_file_is_listed_as_damaged(mnist, capsys):
    """Loading refuses a file failing its md5 check and downloads do not replace it: the listing says so."""
    root, _ = mnist
    with open(root / "mnist" / "t10k-labels-idx1-ubyte.gz", "ab") as f:
        f.write(b"\0")
    listed = {d.name: d for d in list_datasets()}
    assert not listed["mnist"].present
    assert "t10k-labels-idx1-ubyte.gz fails its md5 check" in listed["mnist"].damaged
    assert listed["cifar10"].damaged is None and listed["digits"].present
    assert main(["datasets"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "damaged" in out and "fails its md5 check; delete it" in out


@pytest.mark.skipif(not (REAL_DATA / "mnist").is_dir(), reason="needs the real MNIST files")
def test_real_mnist():
    d = load_dataset("mnist", REAL_DATA, val_split=0)
    assert (len(d.train), len(d.test)) == (60000, 10000)
    assert d.mean[0] == pytest.approx(0.1307, abs=1e-4) and d.std[0] == pytest.approx(0.3081, abs=1e-4)


def test_a_subset_larger_than_the_training_set_is_said():
    with pytest.warns(UserWarning, match="subset 100,000 is more than the 1,293 training images of digits"):
        assert len(load_dataset("digits", subset=100_000).train) == 1293


def test_a_bad_mirror_falls_through_to_the_next(tmp_path, monkeypatch, server):
    served, url = server
    make_mnist(served / "good")
    trust(monkeypatch, "mnist", served / "good")
    make_mnist(served / "bad", n_train=10)  # other bytes under the same names: a changed mirror, a portal's page
    monkeypatch.setitem(DATASETS["mnist"], "mirrors", [url + "bad/", url + "good/"])
    assert len(load_dataset("mnist", tmp_path / "data", val_split=0).train) == 50


def test_folders_of_images_that_are_not_square_or_too_big_need_an_image_size(tmp_path):
    for i in range(4):
        make_image(tmp_path / "f" / "ab"[i % 2] / f"{i}.png", size=(24, 10))
    with pytest.raises(ImgclfError, match=r"are 24x10 \(not square\); pass --image-size N .* --image-size 24"):
        load_dataset(str(tmp_path / "f"), tmp_path / "cache")
    assert load_dataset(str(tmp_path / "f"), tmp_path / "cache", image_size=10).image_shape == (3, 10, 10)
    for i in range(4):
        make_image(tmp_path / "big" / "ab"[i % 2] / f"{i}.png", size=(1100, 1100))
    with pytest.raises(ImgclfError, match="more than 1024 pixels a side.*--image-size 64"):
        load_dataset(str(tmp_path / "big"), tmp_path / "cache")


def test_a_phone_photo_counts_at_its_shown_size(tmp_path):
    image = Image.new("RGB", (20, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # shown turned by 90 degrees: 10 wide, 20 high
    image.save(tmp_path / "photo.jpg", exif=exif)
    assert data.read_header(str(tmp_path / "photo.jpg")) == (10, 20, False)


def test_split_folders_go_by_their_usual_names_and_stray_class_folders_are_refused(tmp_path):
    for split, n in (("Training", 4), ("valid", 2), ("Testing", 2)):
        for i in range(n):
            make_image(tmp_path / "f" / split / "ab"[i % 2] / f"{i}.png")
    d = load_dataset(str(tmp_path / "f"), tmp_path / "cache")
    assert d.class_names == ["a", "b"] and (len(d.train), len(d.val), len(d.test)) == (4, 2, 2)
    make_image(tmp_path / "f" / "cat" / "1.png")  # beside the split folders: it would be ignored
    with pytest.raises(ImgclfError, match=r"\(Testing/, Training/, valid/\) and also cat/: move .*/Training/"):
        load_dataset(str(tmp_path / "f"), tmp_path / "cache")
    (tmp_path / "f" / "cat" / "1.png").unlink()
    (tmp_path / "f" / "cat").rmdir()
    (tmp_path / "f" / "val").mkdir()
    with pytest.raises(ImgclfError, match="has both val/ and valid/ for one split"):
        load_dataset(str(tmp_path / "f"), tmp_path / "cache")


def test_a_class_named_train_beside_other_classes_is_a_class(tmp_path):
    for i, label in enumerate(["bus", "car", "train"] * 2):  # CIFAR-100 has a class called train
        make_image(tmp_path / "f" / label / f"{i}.png")
    with pytest.warns(UserWarning, match="train/ holds images, not class folders, beside 2 other folders: it is "
                                         "read as a class named train"):
        d = load_dataset(str(tmp_path / "f"), tmp_path / "cache", val_split=0)
        assert data.own_val_folder(tmp_path / "f") is None
    assert d.class_names == ["bus", "car", "train"] and sum(map(len, d.splits().values())) == 6
    for i, folder in enumerate(["train", "test1"]):  # Kaggle's flat splits: no class folders, so refused
        make_image(tmp_path / "kaggle" / folder / f"cat.{i}.png")
    with pytest.raises(ImgclfError, match=r"\(train/\) and also test1/"):
        load_dataset(str(tmp_path / "kaggle"), tmp_path / "cache")
    (tmp_path / "f" / "train" / "x").mkdir()  # a split folder after all: the others are strays
    make_image(tmp_path / "f" / "train" / "x" / "9.png")
    with pytest.raises(ImgclfError, match=r"\(train/\) and also bus, car/"):
        load_dataset(str(tmp_path / "f"), tmp_path / "cache")


def test_a_subset_converts_only_the_images_it_keeps(mnist, monkeypatch):
    sizes = []
    real = data._resize
    monkeypatch.setattr(data, "_resize", lambda images, size: sizes.append(len(images)) or real(images, size))
    d = load_dataset("mnist", val_split=0.2, subset=20, image_size=np.int64(8), seed=np.int64(1))
    assert sorted(sizes) == [10, 20, 20] and d.train.images.shape[1:] == (1, 8, 8)  # val, train, test
    assert d.loaded_with["image_size"] == 8 and type(d.loaded_with["image_size"]) is int  # JSON writes it
    assert len(load_dataset("mnist", val_split=np.float32(0.2)).val) == 10


def test_too_large_an_image_size_for_memory_is_one_line(mnist, monkeypatch):
    empty = torch.empty

    def no_memory(shape, **kwargs):  # as torch fails for 70,000 images at 1024 px
        if shape[-1] == 1000:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 50000000 bytes")
        return empty(shape, **kwargs)

    monkeypatch.setattr(torch, "empty", no_memory)
    with pytest.raises(ImgclfError, match=r"not enough memory for 50 images at 1000x1000 pixels \(0\.05 GiB\); "
                                          "use a smaller --image-size"):
        load_dataset("mnist", val_split=0, image_size=1000)
    with pytest.raises(ImgclfError, match="give a dataset name"):
        load_dataset("")  # not the working directory


def test_dangling_links_and_32_bit_images_are_skipped_with_the_unreadable(tmp_path):
    for i in range(4):
        make_image(tmp_path / "f" / "ab"[i % 2] / f"{i}.png")
    (tmp_path / "f" / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # an un-fetched git-annex file
    Image.fromarray(np.full((12, 12), 0.5, np.float32)).save(tmp_path / "f" / "b" / "float.tif")
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\) that are not .* e\.g\. .*gone\.png, .*float\.tif"):
        d = load_dataset(str(tmp_path / "f"), tmp_path / "cache", val_split=0)
    assert len(d.train) + len(d.test) == 4
    with pytest.raises(data.UnsupportedImage, match="convert it to 8 or 16 bits"):
        data.read_image(tmp_path / "f" / "b" / "float.tif", "L", (12, 12))


def test_a_changed_folder_replaces_its_cache(tmp_path):
    for i in range(4):
        make_image(tmp_path / "f" / "ab"[i % 2] / f"{i}.png")
    load_dataset(str(tmp_path / "f"), tmp_path / "cache")
    make_image(tmp_path / "f" / "a" / "new.png")
    load_dataset(str(tmp_path / "f"), tmp_path / "cache")
    load_dataset(str(tmp_path / "f"), tmp_path / "cache", grayscale=True)  # another reading keeps its own
    assert len(list((tmp_path / "cache" / "folder-cache").glob("*.npz"))) == 2


def test_the_validation_split_never_takes_a_class_whole():
    lone = np.array([0] * 10 + [1] * 10 + [2])
    for seed in range(20):
        train, val = data._split_indices(lone, seed, test_size=0.3)
        assert set(lone[train]) == {0, 1, 2} and len(train) + len(val) == len(lone)
    d = load_dataset("digits", val_split=0.999)
    assert d.class_counts()["train"] == [1] * 10


def test_a_class_of_one_image_trains_and_the_others_stay_stratified():
    labels = np.array([0] * 900 + [1] * 100 + [2])  # sklearn refuses to stratify any class beside the lone one
    for seed in range(3):
        train, val = data._split_indices(labels, seed, test_size=0.1)
        assert np.bincount(labels[val], minlength=3).tolist() == [90, 10, 0]
        assert 1000 in train
    train, _ = data._split_indices(labels, 0, train_size=101)  # a subset of 101: the lone image is one of them
    assert np.bincount(labels[train], minlength=3).tolist() == [90, 10, 1]


def test_images_outside_class_folders_are_said_and_class_names_are_one_unicode_form(tmp_path):
    make_folder(tmp_path / "f")
    make_image(tmp_path / "f" / "train" / "stray.png")
    make_image(tmp_path / "f" / "loose.jpg")
    (tmp_path / "f" / "README.txt").write_text("not an image: not worth a word")
    for split, form in (("train", "NFC"), ("test", "NFD")):  # as an archive made on macOS may mix them
        make_image(tmp_path / "f" / split / unicodedata.normalize(form, "café") / "1.png")
    with pytest.warns(UserWarning) as said:
        d = load_dataset(str(tmp_path / "f"), tmp_path / "cache")
    said = [str(w.message) for w in said]
    assert any("train: 1 image(s) outside any class folder are not used, e.g. stray.png" in m for m in said)
    assert any("loose.jpg" in m for m in said) and not any("README" in m for m in said)
    assert d.class_names == ["café", "cat", "dog"] and d.class_counts()["test"][0] == 1


def test_linked_folders_inside_a_class_are_read_once_even_in_a_loop(tmp_path):
    for i in range(4):
        make_image(tmp_path / "f" / "ab"[i % 2] / f"{i}.png")
        make_image(tmp_path / "more" / f"{i}.png")
    (tmp_path / "f" / "a" / "more").symlink_to(tmp_path / "more")  # a dataset assembled from links
    (tmp_path / "more" / "loop").symlink_to(tmp_path / "more")
    assert len(data.files_under(tmp_path / "f" / "a")) == 2 + 4


@pytest.mark.parametrize("call, said", [
    (lambda: load_dataset(5), "give a dataset name (see `imgclf datasets`) or an image folder, not 5"),
    (lambda: load_dataset("digits", 5), "data_dir is a folder path, not 5"),
    (lambda: load_dataset("digits", grayscale="no"), "grayscale is True or False, not 'no'"),
    (lambda: load_dataset("digits", seed="1"), "seed '1': use a whole number from 0 to 2**32 - 1"),
    (lambda: load_dataset("digits", seed=-1), "seed -1: use a whole number"),
    (lambda: load_dataset("digits", image_size="16"), "invalid image size '16'"),
])
def test_wrong_argument_types_are_named(call, said):
    with pytest.raises(ImgclfError, match=re.escape(said)):
        call()


def test_images_copied_into_two_splits_are_counted(tmp_path, write_shapes):
    write_shapes(tmp_path / "f" / "train", 20)
    shutil.copytree(tmp_path / "f" / "train" / "a", tmp_path / "f" / "test" / "a")  # a class's 10 images, copied
    (tmp_path / "f" / "test" / "b").mkdir()
    Image.new("L", (8, 8), 100).save(tmp_path / "f" / "test" / "b" / "new.png")  # a gray no training image has
    data = load_dataset(str(tmp_path / "f"), tmp_path / "cache", val_split=0)
    assert data.also_in_train() == {"test": 10}
    assert data.summary().splitlines()[-1] == "same pixels as a train image: 10 test"
    assert "same pixels" not in load_dataset("digits").summary()


def test_a_data_dir_that_is_a_file_is_named(tmp_path, monkeypatch):
    (tmp_path / "photo.png").write_bytes(b"x")
    with pytest.raises(ImgclfError, match=r"^--data-dir .*photo.png is a file, not a folder; give the folder"):
        load_dataset("mnist", tmp_path / "photo.png")
    monkeypatch.setenv("IMGCLF_DATA", str(tmp_path / "photo.png"))
    with pytest.raises(ImgclfError, match=r"^IMGCLF_DATA .*photo.png is a file"):
        load_dataset("mnist")
