"""The FastAPI application: the API routes, the studio's static files, authentication and errors."""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.core.errors import TunesmithError
from tunesmith.serve.openai_api import error_response
from tunesmith.serve.pool import ModelPool, UnknownModel
from tunesmith.serve.safety import CodeRefused, RemoteModelRefused, SafetyRules
from tunesmith.serve.workspace import Conflict, NotFound, PathRefused, TooLarge, Workspace

STATIC = Path(__file__).parent / "static"
KEY_COOKIE = "tunesmith_key"


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(workspace: str | Path, api_key: Optional[str] = None, bases: Optional[dict[str, str]] = None,
               device: str = "cpu", max_upload_mb: int = 200, max_body_kb: int = 1024,
               batch_window_ms: float = 10.0, max_batch: int = 32, allow_code: bool = False,
               allow_remote_models: bool = False, dtype: str = "float32") -> FastAPI:
    """The server as an ASGI app.

    Args:
        workspace: Folder of data, recipes, runs, exports and the job store (created if missing).
        api_key: Required on every route when given (``Authorization: Bearer KEY``, or the cookie the
            studio sets after ``/?key=KEY``).
        bases: Extra base models by id (``--model``): the only paths outside the workspace it serves.
        max_upload_mb: Largest data upload; max_body_kb: largest body of any other request.
        batch_window_ms: How long generation waits to batch concurrent requests.
        allow_code: ``serve --allow-code``: recipes from the browser may name code (reward functions,
            trust_remote_code, lm-eval include paths); see :mod:`tunesmith.serve.safety`.
        allow_remote_models: ``serve --allow-remote-models``: recipes from the browser may name a hub id as
            ``model.name`` (the job downloads it).
        dtype: ``serve --dtype``: the weights of served models, ``float32``, ``bfloat16`` or ``auto``
            (bfloat16 where the device computes it natively, else float32: :func:`tunesmith.serve.pool.serving_dtype`).
            float32 here, whose replies equal ``tunesmith generate``'s; the ``serve`` command's default is ``auto``.
    """
    from tunesmith.serve import guided, jobs_api, openai_api, playground, studio_api, studio_data
    from tunesmith.serve.batching import BatchingGenerator
    from tunesmith.serve.jobs import JobRunner

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        app.state.generator.close()
        app.state.jobs.close()  # running jobs go on in their own process; the next server follows them

    app = FastAPI(title="tunesmith serve", docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None,
                  lifespan=lifespan)
    app.state.workspace = Workspace(workspace)
    app.state.pool = ModelPool(app.state.workspace, bases, device, dtype)
    app.state.safety = SafetyRules(app.state.workspace, dict(app.state.pool.bases), allow_code,
                                  allow_remote_models)
    app.state.generator = BatchingGenerator(app.state.pool, batch_window_ms / 1000, max_batch)
    app.state.jobs = JobRunner(app.state.workspace)
    app.state.max_upload_bytes = max_upload_mb << 20
    app.state.api_key = api_key

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and not _authorised(request, api_key):
            if request.url.path == "/" and "key" in request.query_params:
                return error_response(401, "wrong key in ?key=", "authentication_error", code="invalid_api_key")
            return error_response(401, "this server needs an API key: send 'Authorization: Bearer KEY' "
                                  "(or open /?key=KEY once in the browser)", "authentication_error",
                                  code="invalid_api_key")
        limit = app.state.max_upload_bytes + (1 << 20) if request.url.path == "/api/upload" else max_body_kb << 10
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return error_response(413, f"request body is larger than the limit of {limit >> 10} KiB")
        if api_key is not None and request.url.path == "/" and "key" in request.query_params:
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(KEY_COOKIE, api_key, httponly=True, samesite="strict")
            return response
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    _add_error_handlers(app)
    app.include_router(openai_api.router)
    app.include_router(studio_api.router)
    for studio_routes in (studio_data, guided, playground):  # data preview/inspect, the guided path, playground
        app.include_router(studio_routes.router, prefix="/api")
    app.include_router(jobs_api.router)

    @app.get("/", include_in_schema=False)
    async def studio():
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": _CSP})

    @app.get("/favicon.ico", include_in_schema=False)
    async def no_icon():
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    return app


# Only our own scripts run in the studio: no inline script, nothing from another origin.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "frame-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'")


def _authorised(request: Request, api_key: str) -> bool:
    header = request.headers.get("authorization", "")
    offered = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(KEY_COOKIE, "")
    if request.url.path == "/" and "key" in request.query_params:
        offered = request.query_params["key"]
    return hmac.compare_digest(offered.encode(), api_key.encode())  # constant time


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UnknownModel)
    async def unknown_model(request: Request, error: UnknownModel):
        return error_response(404, str(error), param="model", code="model_not_found")

    @app.exception_handler(PathRefused)
    async def path_refused(request: Request, error: PathRefused):
        return error_response(403, str(error), "permission_error", param="path", code="path_refused")

    @app.exception_handler(CodeRefused)
    async def code_refused(request: Request, error: CodeRefused):
        return error_response(403, str(error), "permission_error", code="code_refused")

    @app.exception_handler(RemoteModelRefused)
    async def remote_model_refused(request: Request, error: RemoteModelRefused):
        return error_response(403, str(error), "permission_error", param="model.name", code="remote_model_refused")

    @app.exception_handler(NotFound)
    async def not_found(request: Request, error: NotFound):
        return error_response(404, str(error), code="not_found")

    @app.exception_handler(Conflict)
    async def conflict(request: Request, error: Conflict):
        return error_response(409, str(error), code="conflict")

    @app.exception_handler(TooLarge)
    async def too_large(request: Request, error: TooLarge):
        return error_response(413, str(error), code="too_large")

    @app.exception_handler(TunesmithError)
    async def user_error(request: Request, error: TunesmithError):
        return error_response(400, str(error))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        if any(item["type"] == "json_invalid" for item in error.errors()):
            return error_response(400, "request body is not valid JSON", code="invalid_json")
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"] if part != "body")
            problems.append(f"{where}: {item['msg']}" if where else item["msg"])
        first = error.errors()[0]["loc"] if error.errors() else ()
        param = ".".join(str(part) for part in first if part != "body") or None
        return error_response(400, "invalid request: " + "; ".join(problems), param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail))
