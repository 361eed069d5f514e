"""The FastAPI app: JSON API, the loss plot, run files, and the static pages.

Routes (all JSON unless noted; errors are ``{"error": ..., "field": ...}`` with a 4xx status,
503 when a model's queue is full):

- ``GET /`` playground page, ``GET /run/{name}`` run page (HTML, from ``static/``);
- ``GET /runs``: the served runs; ``GET /runs/{name}``: config, checkpoints, curves, eval rows,
  sample files and compare reports of one run;
- ``GET /runs/{name}/modes?checkpoint=STEP``: the modes the model serves (loads it once);
- ``GET /runs/{name}/metrics``: loss curves; ``GET /runs/{name}/plots/loss.png`` (PNG);
- ``GET /runs/{name}/files/{path}``: a file inside the run folder (never outside it);
- ``GET /runs/{name}/compare/{id}/{file}``: a plot of a compare report naming the run;
- ``GET /models``: loaded models and their queues;
- ``POST /generate``: a JSON object or multipart form (``image`` as a file upload);
- ``GET /api/openapi.json``: the OpenAPI schema; ``GET /api/docs``: the routes as a plain page
  (no scripts or styles from a CDN: the server works offline).

Request bodies are bounded before they are parsed (``Limits.max_body_bytes``, nesting depth
``Limits.max_json_depth``; uploads ``max_upload_bytes`` and ``max_image_pixels``), and uploads
are decoded by the datasets' decoder (``data/images.py``) in a worker thread, never on the event
loop.
"""

from __future__ import annotations

import html
import logging
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import Message, Receive

from sparsefusion.checkpoint.store import CheckpointError
from sparsefusion.data.issues import BadInput
from sparsefusion.data.limits import parse_json
from sparsefusion.serve.models import Backend, ModelPool, QueueFull
from sparsefusion.serve.params import (
    FieldError,
    Limits,
    decode_image,
    parse_checkpoint,
    parse_params,
)
from sparsefusion.serve.paths import UnsafePath, media_type, safe_file
from sparsefusion.serve.plots import loss_plot_png
from sparsefusion.serve.render import sample_json
from sparsefusion.serve.runs import RunCatalog, RunInfo, summary

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)
STATIC = resources.files("sparsefusion.serve") / "static"
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the other fields, beyond the image itself


def create_app(
    catalog: RunCatalog,
    backend: Backend,
    limits: Limits | None = None,
    allowed_hosts: list[str] | None = None,
) -> FastAPI:
    """Build the app over the given runs.

    Args:
        catalog: the run folders served.
        backend: loads a run's model at a checkpoint (``sparsefusion.serve.engine`` in the CLI).
        limits: request limits and the per-model queue length.
        allowed_hosts: accepted ``Host`` headers (None: any). A server bound to 127.0.0.1 passes
            the loopback names, so a web page cannot reach it through DNS rebinding.
    """
    limits = limits or Limits()
    pool = ModelPool(backend, limits.queue_size, limits.max_batch)
    app = FastAPI(
        title="sparsefusion serve",
        docs_url=None,  # FastAPI's docs page loads its scripts from a CDN
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.state.catalog, app.state.pool, app.state.limits = catalog, pool, limits
    _add_error_handlers(app)
    _add_pages(app, catalog)
    _add_run_routes(app, catalog, pool)
    _add_generate(app, catalog, pool, limits)
    _add_api_docs(app)
    return app


def _add_api_docs(app: FastAPI) -> None:
    @app.get("/api/docs", include_in_schema=False)
    async def api_docs() -> HTMLResponse:
        rows = []
        for path, ops in app.openapi().get("paths", {}).items():
            for method, op in ops.items():
                what = html.escape(op.get("summary", ""))
                rows.append(f"<li><code>{method.upper()} {html.escape(path)}</code> {what}</li>")
        page = (
            "<!doctype html><meta charset=utf-8><title>sparsefusion serve API</title>"
            f"<h1>sparsefusion serve API</h1><p><a href='{app.openapi_url}'>OpenAPI schema "
            f"(JSON)</a></p><ul>{''.join(rows)}</ul>"
        )
        return HTMLResponse(page)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FieldError)
    async def field_error(request: Request, e: FieldError) -> JSONResponse:
        return JSONResponse({"error": str(e), "field": e.field}, status_code=e.status)

    @app.exception_handler(CheckpointError)
    async def damaged_checkpoint(request: Request, e: CheckpointError) -> JSONResponse:
        return JSONResponse({"error": str(e), "field": "checkpoint"}, status_code=409)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull) -> JSONResponse:
        body = {"error": f"busy: {e}; try again shortly", "field": None}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("request %s failed", request.url.path)
        return JSONResponse({"error": f"{type(e).__name__}: {e}", "field": None}, 500)


def _run(catalog: RunCatalog, name: str) -> RunInfo:
    run = catalog.get(name)
    if run is None:
        known = ", ".join(catalog.runs)
        raise FieldError("run", f"unknown run {name!r} (runs: {known})", 404)
    return run


def _add_pages(app: FastAPI, catalog: RunCatalog) -> None:
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"))

    @app.get("/run/{name}", include_in_schema=False)
    async def run_page(name: str) -> FileResponse:
        _run(catalog, name)
        return FileResponse(str(STATIC / "run.html"))


def _add_run_routes(app: FastAPI, catalog: RunCatalog, pool: ModelPool) -> None:
    # Plain ``def`` routes read files: FastAPI runs them in worker threads, off the event loop.
    @app.get("/runs")
    def list_runs() -> dict[str, Any]:
        return {"runs": [summary(r) for r in catalog]}

    @app.get("/runs/{name}")
    def run_detail(name: str) -> dict[str, Any]:
        return _detail(_run(catalog, name))

    @app.get("/runs/{name}/metrics")
    def run_metrics(name: str) -> dict[str, Any]:
        return {"curves": _run(catalog, name).curves()}

    @app.get("/runs/{name}/plots/loss.png")
    def loss_plot(name: str) -> Response:
        run = _run(catalog, name)
        png = loss_plot_png(run.curves(), run.name)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})

    @app.get("/runs/{name}/modes")
    async def modes(name: str, checkpoint: str | None = None) -> dict[str, Any]:
        run, step = _run(catalog, name), parse_checkpoint(checkpoint)
        step, slot = await run_in_threadpool(pool.slot, run, step)  # validates checkpoint files
        model = slot.model  # once loaded, no need to wait behind a generation
        found = list(model.modes) if model else await slot.submit(lambda m: list(m.modes))
        return {"run": name, "checkpoint": step, "modes": found}

    @app.get("/runs/{name}/files/{path:path}")
    def run_file(name: str, path: str) -> FileResponse:
        run = _run(catalog, name)
        try:
            target = safe_file(run.path, path)
        except UnsafePath as e:
            raise FieldError("path", str(e), 404) from None
        return FileResponse(str(target), media_type=media_type(target))

    @app.get("/runs/{name}/compare/{report}/{file}")
    def compare_plot(name: str, report: str, file: str) -> FileResponse:
        reports = _run(catalog, name).reports()
        found = next((r for r in reports if str(r.id) == report), None)
        if found is None or file not in found.plots:
            raise FieldError("path", f"no compare plot {report}/{file} for run {name!r}", 404)
        return FileResponse(str(found.plots[file]), media_type="image/png")

    @app.get("/models")
    async def models() -> dict[str, Any]:
        return {"loaded": [{"run": r, "checkpoint": s} for r, s in pool.loaded()]}


def _detail(run: RunInfo) -> dict[str, Any]:
    base = f"/runs/{run.name}"
    reports = [
        {
            "id": r.id,
            "folder": str(r.folder),
            "summary": r.summary,
            "plots": [f"{base}/compare/{r.id}/{name}" for name in r.plots],
        }
        for r in run.reports()
    ]
    return {
        **summary(run),
        "config": run.config(),
        "curves": run.curves(),
        "loss_plot": f"{base}/plots/loss.png",
        "eval": run.eval_rows(),
        "samples": [{"path": p, "url": f"{base}/files/{p}"} for p in run.sample_files()],
        "reports": reports,
    }


def _add_generate(app: FastAPI, catalog: RunCatalog, pool: ModelPool, limits: Limits) -> None:
    @app.post("/generate")
    async def generate(request: Request) -> dict[str, Any]:
        fields, image = await _read_request(request, limits)
        params = parse_params(fields, limits, image)
        run = _run(catalog, params.run)
        step, slot = await run_in_threadpool(pool.slot, run, params.checkpoint)
        admitted = time.perf_counter()
        samples, started, done = await slot.generate(params)
        rendered = await run_in_threadpool(lambda: [sample_json(s) for s in samples])
        new_tokens = sum(s["new_tokens"] for s in rendered)
        return {
            "run": params.run,
            "checkpoint": step,
            "mode": params.mode,
            "seed": params.seed,
            "samples": rendered,
            "new_tokens": new_tokens,
            "seconds": done - started,
            "wait_seconds": started - admitted,
            "tokens_per_s": new_tokens / (done - started) if done > started else None,
        }


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused (413) from its Content-Length or once it grows past
    ``max_bytes``, before anything parses it."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise FieldError("body", f"request of {length} bytes exceeds {max_bytes} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise FieldError("body", f"request body exceeds {max_bytes} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _capped(receive: Receive, max_bytes: int) -> Receive:
    """``receive`` that refuses (413) a body growing past ``max_bytes`` (for the form parser)."""
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > max_bytes:
            raise FieldError("image", f"request exceeds the upload limit ({max_bytes} bytes)", 413)
        return message

    return capped


def _json_fields(body: bytes, limits: Limits) -> dict[str, Any]:
    try:
        fields = parse_json(body, "body", limits.max_body_bytes, limits.max_json_depth)
    except BadInput as e:
        status = 422 if e.reason == "oversize_document" else 400
        raise FieldError("body", e.detail, status) from None
    if not isinstance(fields, dict):
        raise FieldError("body", "must be a JSON object", 400)
    if "image" in fields:
        raise FieldError("image", "send an image as a multipart form upload", 415)
    return fields


async def _read_request(request: Request, limits: Limits) -> tuple[dict[str, Any], Any]:
    """The request's fields and its decoded image upload (None without one)."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("application/json"):
        return _json_fields(await _read_body(request, limits.max_body_bytes), limits), None
    if not kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise FieldError("body", "send JSON or a multipart form", 415)
    limit = limits.max_upload_bytes + FORM_OVERHEAD
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise FieldError("image", f"request of {length} bytes exceeds the upload limit", 413)
    capped = Request(request.scope, _capped(request.receive, limit))
    try:
        form = await capped.form(max_files=1, max_fields=32, max_part_size=limits.max_body_bytes)
    except HTTPException as e:  # the form parser's 400s: too many fields, a malformed form
        raise FieldError("body", str(e.detail), 400) from None
    fields: dict[str, Any] = {}
    data = b""
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "image":
                    raise FieldError(key, "unknown upload field (only 'image')")
                data = await value.read(limits.max_upload_bytes + 1)
            else:
                fields[key] = value
    finally:
        await form.close()
    image = await run_in_threadpool(decode_image, data, limits) if data else None
    return fields, image
