"""A prediction server for a trained run (FastAPI): POST image files, get their top labels as JSON.

    imgclf serve runs/mnist-fast --port 8000
    curl -F files=@three.png -F files=@seven.png 'http://127.0.0.1:8000/predict?top_k=3'

Endpoints: GET / (a page with an upload form, no internet needed), GET /health, GET /info (classes, input
shape, TTA), POST /predict (multipart field `files`, one or more images; the answer is the JSON of
`imgclf predict --json`), and the OpenAPI docs at /docs (Swagger UI, whose scripts come from a CDN). The model is
loaded once; predictions use the run's own settings (TTA, precision), as `imgclf predict` does; `?tta=false`
(or `true`) overrides the run's TTA setting for one request.
"""

import html
import io
import logging
import socket
import threading
from pathlib import Path
from typing import Any

import torch

from imgclf import __version__
from imgclf.data import dataset_label
from imgclf.errors import ImgclfError, did_you_mean, quieter_loggers
from imgclf.evaluate import predict, prediction_options, predictions_json, read_images
from imgclf.runs import load_model, warn_if_unfinished

MAX_IMAGE_BYTES = 20 * 2**20  # a larger upload is refused before it is decoded
MAX_REQUEST_BYTES = 256 * 2**20  # all of a request's uploads: refused as it arrives, before it fills the disk
MAX_IMAGES = 256  # per request: bounds the memory one request can take
MAX_PIXELS = 16_000_000  # per image once decoded (JPEGs first at a reduced scale, so any phone photo passes): a
# 170 KB PNG of 6,300 x 6,300 pixels took 6.5 s to decode, while every other request waited
QUERY_PARAMETERS = ("top_k", "tta")  # of /predict: another one (a typo such as topk) is refused, not ignored


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


def create_app(run_dir: str | Path, device: str = "auto"):
    """The FastAPI application serving the trained model in `run_dir`, on `device` (auto: the GPU if any)."""
    fastapi, _ = _import_fastapi()
    from fastapi import File, HTTPException, Query, Request, UploadFile
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    model = load_model(run_dir, device)
    warn_if_unfinished(run_dir)
    arch = model.info.get("architecture", {})
    run_tta, run_options = prediction_options(model, None)
    # The run folder's name, not its path: with --host 0.0.0.0 anyone on the network reads /info.
    about = {"run": Path(run_dir).name, "model": arch.get("name"),
             "dataset": dataset_label(model.info.get("dataset")),
             "classes": model.class_names, "input_shape": list(model.input_shape), "tta": run_tta,
             "precision": run_options["precision"], "imgclf_version": __version__}
    # One request decodes and predicts at a time: a prediction already uses every core, and decoding the
    # uploads of many requests at once would only multiply the memory they take.
    one_at_a_time = threading.Lock()
    app = fastapi.FastAPI(title="imgclf prediction server", version=__version__,
                          description=f"{about['model']} trained on {about['dataset']}, from {about['run']}")

    @app.exception_handler(RequestValidationError)
    def one_line_validation_error(request, error: RequestValidationError):
        """FastAPI's own 422 answer is a list of error objects that echoes the input; say what to send instead."""
        problems = []
        for item in error.errors():
            where = item.get("loc") or ("?",)
            if "files" in where:  # missing, or a part sent as text instead of a file
                problems.append("send one or more image files in the multipart file field `files` "
                                "(curl -F files=@image.png URL/predict)")
            else:
                problems.append(f"{where[-1]}: {item.get('msg', 'invalid')}")
        return JSONResponse(status_code=422, content={"detail": "; ".join(dict.fromkeys(problems))})

    def too_large(size: str) -> JSONResponse:
        return JSONResponse(status_code=413, content={"detail": (
            f"the request is {size}more than the {MAX_REQUEST_BYTES // 2**20} MB a request may hold; send its "
            "images in several requests")})

    @app.middleware("http")
    async def refuse_a_large_request_in_json(request: Request, call_next):
        """A request that declares more than the limit is refused before it is read, in JSON with the fix:
        Starlette's limit (the route's max_body_size) answers it in plain text. One that does not declare its size
        is stopped by that limit as it arrives, and answered by the handler below."""
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
            return too_large(f"{int(declared) / 2**20:,.1f} MB, ")
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def starlette_error_with_fix(request, error: StarletteHTTPException):
        """Starlette's own answers to an oversized or unreadable upload name no fix. The route's own errors are
        FastAPI's subclass, and keep their words."""
        if isinstance(error, HTTPException):
            return await http_exception_handler(request, error)
        if error.status_code == 413:  # a body that declared no size
            return too_large("")
        if error.status_code == 400:  # what the form parser refused
            return JSONResponse(status_code=400, content={"detail": (
                f"the upload could not be read ({str(error.detail).rstrip('.')}); send up to {MAX_IMAGES} images in "
                "the multipart file field `files` (curl -F files=@image.png URL/predict)")})
        return await http_exception_handler(request, error)

    classes = ", ".join(map(str, about["classes"][:20])) + (", ..." if len(about["classes"]) > 20 else "")
    home_page = _HOME.format(title=html.escape(app.description), classes=html.escape(classes),
                             shape="x".join(map(str, about["input_shape"])), max_images=MAX_IMAGES)

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        """A plain page (no scripts, so it works offline) that says what is served and uploads images."""
        return home_page

    @app.get("/health")
    @app.head("/health", include_in_schema=False)  # one operation in the schema, not two of the same id
    async def health() -> dict[str, str]:  # async: on the event loop, so queued predictions do not delay it
        return {"status": "ok"}

    @app.get("/info")
    def info() -> dict[str, Any]:
        return about

    @app.post("/predict", max_body_size=MAX_REQUEST_BYTES)
    def predict_uploads(request: Request,
                        files: list[UploadFile] = File(..., description="one or more image files"),  # noqa: B008
                        top_k: int = Query(3, ge=1, description="how many labels per image"),
                        tta: bool | None = Query(None, description="average the test-time augmentation views "
                                                 "(default: the run's recipe setting, in /info)"),
                        ) -> list[dict[str, Any]]:
        if unknown := [key for key in request.query_params if key not in QUERY_PARAMETERS]:
            raise HTTPException(422, f"unknown query parameter {unknown[0]}{did_you_mean(unknown[0], QUERY_PARAMETERS)}"
                                f"; use {' and '.join(QUERY_PARAMETERS)}")
        if len(files) > MAX_IMAGES:
            raise HTTPException(413, f"{len(files)} images in one request; send at most {MAX_IMAGES} at a time")
        names = [upload.filename or f"image {i + 1}" for i, upload in enumerate(files)]
        with one_at_a_time:
            decoded = []
            for upload, name in zip(files, names, strict=True):  # one upload in memory at a time
                data = upload.file.read(MAX_IMAGE_BYTES + 1)
                if not data:
                    raise HTTPException(400, f"{name} is empty; send the image file's bytes")
                if len(data) > MAX_IMAGE_BYTES:
                    raise HTTPException(413, f"{name} is larger than {MAX_IMAGE_BYTES // 2**20} MB; shrink it first")
                try:
                    decoded.append(read_images([io.BytesIO(data)], model.input_shape, [name], MAX_PIXELS))
                except ImgclfError as e:
                    raise HTTPException(400, str(e)) from None
            results = predict(model, torch.cat(decoded), top_k=top_k, tta=tta)
        return predictions_json(names, results)

    return app


_HOME = """<!doctype html><html><head><meta charset="utf-8"><title>imgclf prediction server</title></head>
<body style="font-family: sans-serif; max-width: 44em; margin: 2em auto">
<h1>imgclf prediction server</h1><p>{title}</p><p>Classes: {classes}. Images are resized to {shape}.</p>
<form action="/predict" method="post" enctype="multipart/form-data">
<p><input type="file" name="files" accept="image/*" multiple required> <button>Predict</button>
(up to {max_images} images; the answer is JSON)</p></form>
<p>POST /predict?top_k=3 (multipart field <code>files</code>), GET /info, GET /health, the OpenAPI schema at
<a href="/openapi.json">/openapi.json</a>, and the interactive <a href="/docs">/docs</a> (needs internet).</p>
</body></html>"""


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound here rather than by uvicorn so that problems are one line and port 0 works."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family)
    except OverflowError:
        raise ImgclfError(f"port {port} is not a port number; use 0 to 65535 (0: any free one)") from None
    except OSError as e:
        reason = (e.strerror or str(e)).split(" (while attempting to bind")[0]  # create_server's addition
        raise ImgclfError(f"cannot listen on {host} port {port} ({reason}); pass another --port or --host") from None


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto") -> None:
    """Serve the run until interrupted; port 0 picks a free port (printed). The model is on `device`."""
    _, uvicorn = _import_fastapi()
    app = create_app(run_dir, device)
    sock = _listen(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    anywhere = " (every network interface)" if host in ("0.0.0.0", "::") else ""
    print(f"serving {run_dir} on http://{shown}:{bound_port}{anywhere} (open it for an upload page, or POST "
          "images to /predict); Ctrl-C stops", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    try:  # python-multipart logs why a malformed upload failed, which the client's answer already says
        with quieter_loggers(logging.ERROR, "python_multipart.multipart"):
            server.run(sockets=[sock])
    finally:
        sock.close()
