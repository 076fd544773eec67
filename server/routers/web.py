"""The root page: the web client's demo when the server has one.

``/`` redirects to ``/web_client/`` (so the page's relative script and model URLs
resolve under it) and ``/web_client`` is a static mount of the web client's folder (the
one that ships with Pollinate unless ``POLLINATE_WEB_CLIENT`` says otherwise; see
``server/web_assets.py``), serving only the files that ship (``servable``: never
``node_modules``, ``package.json``, tests, tools or Python files, in a checkout or installed). Without a page, ``/`` says where the API docs are. A page whose
TF.js files are missing is never served: ``/`` and the page itself answer 503 with what is
missing and how to fix it (the server also refuses to start that way).

``/dashboard`` (``?model=NAME`` for one model) is the monitoring dashboard: a static page
from the ``dashboard`` folder of the web client that ships with Pollinate (served whatever
``POLLINATE_WEB_CLIENT`` says), which draws ``/v1/models/{name}/monitor`` in the browser.

``/try/{name}`` is a model's try-it page: ``try/index.html`` of the served web client (its
script, styles, ``pollinate.js`` and TF.js come from the ``/web_client`` mount, which the page
names with ``<base href="/web_client/try/">``). It builds a form from the manifest's input spec
and predicts in the browser and on the server (``POST /v1/models/{name}/predict``). ``/try``
lists nothing itself: it goes to the demo page's list of models.
"""

from __future__ import annotations

import re
from html import escape
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from server.schemas import ErrorOut, RootOut
from server.state import ServicesDep
from server.web_assets import default_web_client, inspect_web_client, is_default, servable

router = APIRouter(tags=["web"])

WEB_PREFIX = "/web_client"
PAGE_PATHS = ("/", "", "/index.html")  # inside the mount: the page itself
DASHBOARD_ASSETS = {"index.html": "text/html; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8",
                    "dashboard.css": "text/css; charset=utf-8"}
# HTML pages refuse in JSON, like every route: say so (FastAPI would file them under text/html).
JSON_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
# The dashboard changes with Pollinate, not per request: revalidate (Starlette sends ETags).
DASHBOARD_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


TRY_PAGE = Path("try") / "index.html"
TRY_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def dashboard_folder() -> Path:
    return default_web_client() / "dashboard"


def _dashboard_file(name: str) -> FileResponse | JSONResponse:
    path = dashboard_folder() / name
    if name not in DASHBOARD_ASSETS or not path.is_file():
        return JSONResponse({"detail": f"no dashboard file named {name!r}"}, status_code=404)
    return FileResponse(path, media_type=DASHBOARD_ASSETS[name], headers=DASHBOARD_HEADERS)


@router.get("/dashboard", response_class=HTMLResponse,
            responses={404: {"description": "The dashboard's files are missing.", "content": JSON_ERROR}},
            summary="The monitoring dashboard (?model=NAME for one model)")
async def dashboard():
    return _dashboard_file("index.html")


@router.get("/dashboard/{asset}", include_in_schema=False)
async def dashboard_asset(asset: str):
    return _dashboard_file(asset or "index.html")


@router.get("/try/{name}", response_class=HTMLResponse,
            responses={404: {"description": "Not a model name, or no try-it page here.", "content": JSON_ERROR},
                       503: {"description": "The page's TF.js files are missing.", "content": JSON_ERROR}},
            summary="A model's try-it page: a form from its input spec, answered in the browser and by the server")
async def try_page(name: str, svc: ServicesDep):
    if not MODEL_NAME.match(name):
        return JSONResponse({"detail": f"{name!r} is not a model name (1-64 of a-z 0-9 _ . -)"}, status_code=404)
    folder = svc.config.web_client
    if folder is None:
        return JSONResponse({"detail": "the try-it page is part of the web client, and this server runs without it "
                                       "(POLLINATE_WEB_CLIENT=off)"}, status_code=404)
    page = Path(folder) / TRY_PAGE
    if not page.is_file():
        return JSONResponse({"detail": f"the web client at {folder} has no try-it page ({TRY_PAGE.as_posix()})"},
                            status_code=404)
    status = inspect_web_client(Path(folder))
    if not status.whole:
        return _unavailable(status.problem())
    return FileResponse(page, media_type="text/html; charset=utf-8", headers=TRY_HEADERS)


@router.get("/try", include_in_schema=False)
@router.get("/try/", include_in_schema=False)
async def try_index():
    return RedirectResponse(f"{WEB_PREFIX}/#models", status_code=307)


@router.get(
    "/",
    response_model=RootOut,
    responses={
        307: {"description": "To the demo page, when the server has one."},
        503: {"model": ErrorOut, "description": "The demo page is there but its TF.js files are not."},
    },
    summary="The demo page, or where the docs are",
)
async def root(svc: ServicesDep, request: Request):
    status = inspect_web_client(svc.config.web_client)
    if status.whole:
        query = request.url.query  # keep ?channel=… for the page
        return RedirectResponse(f"{WEB_PREFIX}/" + (f"?{query}" if query else ""), status_code=307)
    if status.folder is not None and (status.has_page or is_default(status.folder)):
        return JSONResponse({"detail": f"the demo page is unavailable: {status.problem()}"}, status_code=503)
    return RootOut()


class WebClientFiles(StaticFiles):
    """The web client's folder, its shipped files only (404 for anything else); a plain 404 (not
    a 500) while the folder does not exist, and a 503 page saying what is missing instead of a
    page that would fail in the browser."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.directory is None or not Path(self.directory).is_dir():
            await JSONResponse({"detail": "no web client is installed"}, status_code=404)(scope, receive, send)
            return
        if scope["type"] == "http":
            if scope.get("path", "").removeprefix(scope.get("root_path", "")) in PAGE_PATHS:
                status = inspect_web_client(Path(self.directory))
                if status.has_page and not status.whole:
                    await _unavailable(status.problem())(scope, receive, send)
                    return
            relative = self._served_file(scope)
            own = getattr(self, "_own", None)
            if own is None:
                own = self._own = is_default(Path(self.directory))
            if relative is None or not servable(relative, own):
                await JSONResponse({"detail": "no such file in the web client"}, status_code=404)(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _served_file(self, scope: Scope) -> str | None:
        """The file inside the folder a request names ("index.html" for a folder, as
        ``html=True`` serves it); None for a path outside it."""
        relative = self.get_path(scope).replace("\\", "/")
        if relative in (".", ""):
            return "index.html"
        if relative.startswith("../") or relative == ".." or relative.startswith("/"):
            return None
        if (Path(self.directory) / relative).is_dir():
            return f"{relative}/index.html"
        return relative


def _unavailable(problem: str | None) -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html><meta charset=utf-8><title>Pollinate: demo page unavailable</title>"
        f"<h1>The demo page is unavailable</h1><p>{escape(problem or '')}</p>"
        '<p>The API still works: <a href="/docs">/docs</a>.</p>',
        status_code=503, headers={"Cache-Control": "no-store"},
    )
