"""A prediction server for a trained run (FastAPI): POST image files, get their top labels as JSON.

    imgclf serve runs/mnist-fast --port 8000
    curl -F files=@three.png -F files=@seven.png 'http://127.0.0.1:8000/predict?top_k=3'

Endpoints: GET /health, GET /info (classes, input shape, TTA), POST /predict (multipart field `files`, one or
more images; the answer is the JSON of `imgclf predict --json`), and the OpenAPI docs at /docs. The model is
loaded once; predictions use the run's own settings (TTA, precision), as `imgclf predict` does.
"""

import io
import os
import socket
import threading
from pathlib import Path
from typing import Any

from imgclf import __version__
from imgclf.errors import ImgclfError
from imgclf.evaluate import predict, predictions_json, read_images
from imgclf.runs import load_model

MAX_IMAGE_BYTES = 20 * 2**20  # a larger upload is refused before it is decoded
MAX_IMAGES = 256  # per request: bounds the memory one request can take


def _import_fastapi():
    try:
        import fastapi
        import python_multipart  # noqa: F401  (FastAPI reads file uploads with it)
        import uvicorn
    except ImportError as e:
        package = "python-multipart" if e.name == "python_multipart" else e.name
        raise ImgclfError(f"the prediction server needs the {package} package: pip install fastapi uvicorn "
                          "python-multipart (or the imgclf[serve] extra)") from None
    return fastapi, uvicorn


def create_app(run_dir: str | Path):
    """The FastAPI application serving the trained model in `run_dir`."""
    fastapi, _ = _import_fastapi()
    from fastapi import File, HTTPException, Query, UploadFile

    model = load_model(run_dir)
    arch = model.info.get("architecture", {})
    about = {"run": str(run_dir), "model": arch.get("name"), "dataset": model.info.get("dataset"),
             "classes": model.class_names, "input_shape": list(model.input_shape),
             "tta": bool(model.info.get("tta", False)), "imgclf_version": __version__}
    one_at_a_time = threading.Lock()  # a prediction already uses every core; concurrent ones would only thrash
    app = fastapi.FastAPI(title="imgclf prediction server", version=__version__,
                          description=f"{about['model']} trained on {about['dataset']}, from {run_dir}")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    def info() -> dict[str, Any]:
        return about

    @app.post("/predict")
    def predict_files(files: list[UploadFile] = File(..., description="one or more image files"),  # noqa: B008
                      top_k: int = Query(5, ge=1, description="how many labels per image")) -> list[dict[str, Any]]:
        if len(files) > MAX_IMAGES:
            raise HTTPException(413, f"{len(files)} images in one request; send at most {MAX_IMAGES} at a time")
        sources, names = [], []
        for i, upload in enumerate(files):
            data = upload.file.read(MAX_IMAGE_BYTES + 1)
            name = upload.filename or f"image {i + 1}"
            if len(data) > MAX_IMAGE_BYTES:
                raise HTTPException(413, f"{name} is larger than {MAX_IMAGE_BYTES // 2**20} MB; shrink it first")
            sources.append(io.BytesIO(data))
            names.append(name)
        try:
            images = read_images(sources, model.input_shape, names)
        except ImgclfError as e:
            raise HTTPException(400, str(e)) from None
        with one_at_a_time:
            results = predict(model, images, top_k=top_k)
        return predictions_json(names, results)

    return app


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the run until interrupted; port 0 picks a free port (printed)."""
    _, uvicorn = _import_fastapi()
    app = create_app(run_dir)
    try:
        # Bound here rather than by uvicorn, so a busy port is a one-line error and port 0 can be printed.
        sock = socket.create_server((host, port))
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise ImgclfError(f"cannot listen on {host}:{port} ({reason}); pass another --port or --host") from None
    bound_host, bound_port = sock.getsockname()[:2]
    print(f"serving {run_dir} on http://{bound_host}:{bound_port} (POST images to /predict, API docs at /docs); "
          "Ctrl-C stops", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
