"""The root page: the web client's demo once ``web_client/index.html`` exists.

``/`` redirects to ``/web_client/`` (so the page's relative script and model URLs
resolve under it) and ``/web_client`` is a static mount of the repository's folder.
Until the folder has an index, ``/`` says where the API docs are.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from server.schemas import RootOut
from server.state import ServicesDep

router = APIRouter(tags=["web"])

WEB_PREFIX = "/web_client"


@router.get(
    "/",
    response_model=RootOut,
    responses={307: {"description": "To the demo page, when web_client/ has one."}},
    summary="The demo page, or where the docs are",
)
async def root(svc: ServicesDep, request: Request):
    if (svc.config.web_client / "index.html").is_file():
        query = request.url.query  # keep ?channel=… for the page
        return RedirectResponse(f"{WEB_PREFIX}/" + (f"?{query}" if query else ""), status_code=307)
    return RootOut()


class WebClientFiles(StaticFiles):
    """The web client's folder; a plain 404 (not a 500) while the folder does not exist."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.directory is None or not Path(self.directory).is_dir():
            await JSONResponse({"detail": "no web client is installed"}, status_code=404)(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
