"""The prediction server: the answers of `imgclf predict`, over HTTP, and clear 4xx errors for bad uploads."""

import importlib
import io
import json
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from test_export import saved_run

from imgclf import serve as serve_module
from imgclf.device import prediction_precision
from imgclf.evaluate import predict, predictions_json, read_images
from imgclf.serve import create_app


def png(seed: int, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return saved_run(tmp_path_factory.mktemp("serve") / "run", "lenet", 1, 28)


@pytest.fixture(scope="module")
def client(run):
    return TestClient(create_app(run))


def test_health_and_info(client):
    assert client.get("/health").json() == {"status": "ok"} and client.head("/health").status_code == 200
    info = client.get("/info").json()
    assert info["classes"] == ["a", "b", "c", "d"] and info["input_shape"] == [1, 28, 28] and info["model"] == "lenet"
    assert info["precision"] == "fp32" and info["tta"] is False


def test_the_home_page_uploads_to_predict_without_scripts(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'action="/predict"' in page.text and 'name="files"' in page.text and "a, b, c, d" in page.text
    assert "<script" not in page.text  # nothing fetched from the internet


def test_predict_answers_what_predict_answers(client, run, tmp_path):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"img{i}.png")
        paths[-1].write_bytes(png(i))
    response = client.post("/predict", params={"top_k": 2},
                           files=[("files", (p.name, p.read_bytes(), "image/png")) for p in paths])
    assert response.status_code == 200
    expected = predictions_json([p.name for p in paths], predict(run, paths, top_k=2))
    got = response.json()
    assert [r["image"] for r in got] == ["img0.png", "img1.png"] and all(len(r["top"]) == 2 for r in got)
    for g, e in zip(got, expected, strict=True):
        assert [t["label"] for t in g["top"]] == [t["label"] for t in e["top"]]
        np.testing.assert_allclose([t["probability"] for t in g["top"]], [t["probability"] for t in e["top"]],
                                   rtol=1e-5)


def test_tta_can_be_switched_per_request(tmp_path):
    run = saved_run(tmp_path / "run", "lenet", 1, 28, tta=True, augment=["crop", "flip"])
    client = TestClient(create_app(run))
    assert client.get("/info").json()["tta"] is True
    files = [("files", ("a.png", png(0), "image/png"))]
    image = read_images([io.BytesIO(png(0))], (1, 28, 28))
    expected = {tta: [p for _, p in predict(run, image, top_k=4, tta=tta)[0]] for tta in (True, False)}
    assert expected[True] != expected[False]
    for query, tta in ((None, True), ("true", True), ("false", False)):
        params = {"top_k": 4} | ({"tta": query} if query else {})
        got = client.post("/predict", params=params, files=files).json()[0]["top"]
        np.testing.assert_allclose([t["probability"] for t in got], expected[tta], rtol=1e-5)
    response = client.post("/predict", params={"tta": "maybe"}, files=files)
    assert response.status_code == 422 and response.json()["detail"].startswith("tta: ")


def test_a_reduced_precision_run_predicts_in_what_this_cpu_does_fast(tmp_path, monkeypatch):
    run = saved_run(tmp_path / "run", "lenet", 1, 28, precision="bf16")
    cpu, device_module = torch.device("cpu"), importlib.import_module("imgclf.device")
    for fast_bf16, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(device_module, "cpu_has_fast_bf16", lambda fast=fast_bf16: fast)
        assert prediction_precision("bf16", cpu) == prediction_precision("fp16", cpu) == expected
        assert prediction_precision("fp32", cpu) == "fp32"
        assert TestClient(create_app(run)).get("/info").json()["precision"] == expected


def test_bad_uploads_get_a_clear_4xx(client, monkeypatch):
    response = client.post("/predict", files=[("files", ("notes.png", b"not an image", "image/png"))])
    assert response.status_code == 400 and "notes.png is not an image" in response.json()["detail"]
    response = client.post("/predict")  # no files at all
    assert response.status_code == 422 and "multipart file field `files`" in response.json()["detail"]
    response = client.post("/predict", data={"files": "text, not a file"})
    assert response.status_code == 422 and "multipart file field `files`" in response.json()["detail"]
    response = client.post("/predict", params={"top_k": 0}, files=[("files", ("a.png", png(0), "image/png"))])
    assert response.status_code == 422 and response.json()["detail"].startswith("top_k: ")
    response = client.post("/predict", files=[("files", ("multipart.png", b"", "image/png"))])
    assert response.status_code == 400 and response.json()["detail"].startswith("multipart.png is empty")
    for content_type, body in (("multipart/form-data", png(0)), ("multipart/form-data; boundary=xyz", b"garbage")):
        response = client.post("/predict", content=body, headers={"content-type": content_type})
        assert response.status_code == 400 and response.json()["detail"].startswith("the upload could not be read (")
        assert "(curl -F files=@image.png URL/predict)" in response.json()["detail"]
    monkeypatch.setattr(serve_module, "MAX_PIXELS", 1000)
    response = client.post("/predict", files=[("files", ("wide.png", png(0), "image/png"))])
    assert response.status_code == 400 and "wide.png is 40x40, more than the 1,000 pixels" in response.json()["detail"]
    monkeypatch.setattr(serve_module, "MAX_IMAGE_BYTES", 100)
    response = client.post("/predict", files=[("files", ("big.png", png(0), "image/png"))])
    assert response.status_code == 413 and "big.png is larger" in response.json()["detail"]
    monkeypatch.setattr(serve_module, "MAX_IMAGES", 1)
    response = client.post("/predict", files=[("files", ("a.png", b"x", "image/png"))] * 2)
    assert response.status_code == 413 and "at most 1" in response.json()["detail"]


def test_a_large_request_is_refused_as_it_arrives_and_unknown_parameters_are_named(run, monkeypatch):
    monkeypatch.setattr(serve_module, "MAX_REQUEST_BYTES", 3000)  # read when the app is made
    client = TestClient(create_app(run))
    response = client.post("/predict", files=[("files", ("a.png", png(0), "image/png"))])  # a 4.9 KB PNG
    assert response.status_code == 413 and "more than the 0 MB a request may hold; send its images in several" \
        in response.json()["detail"]
    body, boundary = png(0), "b0undary"  # the same upload, streamed without a declared size: the route's limit
    form = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
    response = client.post("/predict", content=(form[i:i + 1000] for i in range(0, len(form), 1000)),
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413 and response.json()["detail"].startswith(
        "the request is more than the 0 MB a request may hold; send its images in several")
    response = client.post("/predict", params={"topk": 1}, files=[("files", ("a.png", png(0, 8), "image/png"))])
    assert response.status_code == 422 and response.json()["detail"] == (
        "unknown query parameter topk (did you mean 'top_k'?); use top_k and tta")
    assert client.get("/info").json()["run"] == run.name  # not the server's folders
    assert list(client.get("/openapi.json").json()["paths"]["/health"]) == ["get"]  # HEAD works, unlisted


def test_cli_serves_until_stopped(run):
    server = subprocess.Popen([sys.executable, "-m", "imgclf", "serve", str(run), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert "serving" in line, server.stderr.read()
        url = line.split(" on ")[1].split()[0]
        with urllib.request.urlopen(f"{url}/health", timeout=30) as response:
            assert json.load(response) == {"status": "ok"}
    finally:
        server.terminate()
        server.wait(timeout=30)
