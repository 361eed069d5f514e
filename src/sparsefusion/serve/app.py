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
- ``POST /generate``: a JSON object or multipart form (``image`` as a file upload).
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.middleware.trustedhost import TrustedHostMiddleware

from sparsefusion.serve.models import Backend, LoadedModel, ModelPool, QueueFull
from sparsefusion.serve.params import (
    FieldError,
    GenerateParams,
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
    from sparsefusion.generate import Sample

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
    pool = ModelPool(backend, limits.queue_size)
    app = FastAPI(title="sparsefusion serve", docs_url="/api/docs", redoc_url=None)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.state.catalog, app.state.pool, app.state.limits = catalog, pool, limits
    _add_error_handlers(app)
    _add_pages(app, catalog)
    _add_run_routes(app, catalog, pool)
    _add_generate(app, catalog, pool, limits)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FieldError)
    async def field_error(request: Request, e: FieldError) -> JSONResponse:
        return JSONResponse({"error": str(e), "field": e.field}, status_code=e.status)

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
        step, slot = pool.slot(_run(catalog, name), parse_checkpoint(checkpoint))
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
        step, slot = pool.slot(_run(catalog, params.run), params.checkpoint)
        admitted = time.perf_counter()
        samples, started, done = await slot.submit(lambda model: _generate(model, params))
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


def _generate(model: LoadedModel, params: GenerateParams) -> tuple[list[Sample], float, float]:
    if params.mode not in model.modes:
        raise FieldError(
            "mode", f"run {params.run!r} cannot serve {params.mode!r} (modes: {model.modes})"
        )
    started = time.perf_counter()
    samples = model.generate(params)
    return samples, started, time.perf_counter()


async def _read_request(request: Request, limits: Limits) -> tuple[dict[str, Any], Any]:
    """The request's fields and its decoded image upload (None without one)."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("application/json"):
        try:
            body = await request.json()
        except ValueError as e:
            raise FieldError("body", f"invalid JSON: {e}", 400) from None
        if not isinstance(body, dict):
            raise FieldError("body", "must be a JSON object", 400)
        if "image" in body:
            raise FieldError("image", "send an image as a multipart form upload", 415)
        return body, None
    if not kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise FieldError("body", "send JSON or a multipart form", 415)
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limits.max_upload_bytes + FORM_OVERHEAD:
        raise FieldError("image", f"request of {length} bytes exceeds the upload limit", 413)
    form = await request.form(max_files=1, max_fields=32)
    fields: dict[str, Any] = {}
    image = None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != "image":
                raise FieldError(key, "unknown upload field (only 'image')")
            data = await value.read(limits.max_upload_bytes + 1)
            if data:
                image = decode_image(data, limits)
        else:
            fields[key] = value
    return fields, image
