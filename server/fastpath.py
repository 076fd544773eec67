"""A pure-ASGI shortcut for the two hottest requests when their answer is cached:
a channel manifest, and a file whose address the server already looked up.

Every client revalidates its channel's manifest whenever it starts, so that one request
decides how many clients a core can carry. Going through FastAPI (routing, dependency
injection, validation, a Response object) costs ~0.3 ms; this shortcut answers a cached
manifest — 200 or 304 — straight from :class:`server.catalog.Catalog`'s snapshot
(~10,000 answers/s on one core instead of ~2,500), and a known file with the same
:class:`server.blobs.BlobResponse` the route would return.

It only *answers* when everything is well-formed and already cached; anything else (an
unknown model, a bad channel name, a cold cache, a HEAD manifest) falls through to the
FastAPI route, which validates, loads, fills the cache and documents the route in
OpenAPI. Both paths build their answers with the same functions, so they cannot drift.
The metrics middleware sees the FastAPI route object in ``scope["route"]``, so the
shortcut's requests are labelled with the same route template.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from registry.channels import CHANNEL_NAME
from registry.store import MODEL_NAME
from server.blobs import BlobResponse, BlobStore
from server.catalog import Catalog
from server.manifest import NO_CACHE, manifest_answer
from server.metrics import count_manifest

PREFIX = "/v1/models/"
SUFFIX = "/manifest"
MAX_CLIENT_ID = 256  # the route's Query(max_length=...) too


class FastPath:
    """Answers cached manifests and known files itself; passes everything else on."""

    def __init__(
        self, app: ASGIApp, catalog: Catalog, blobs: BlobStore, manifest_route: BaseRoute, file_route: BaseRoute
    ):
        self.app = app
        self.catalog = catalog
        self.blobs = blobs
        self.manifest_route = manifest_route
        self.file_route = file_route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            method = scope["method"]
            if path.startswith(PREFIX):
                if path.endswith(SUFFIX):
                    if method == "GET" and await self._manifest(scope, send, path):
                        return
                elif method in ("GET", "HEAD") and await self._file(scope, receive, send, path):
                    return
        await self.app(scope, receive, send)

    async def _file(self, scope: Scope, receive: Receive, send: Send, path: str) -> bool:
        # /v1/models/{name}/versions/{version}/files/{format}/{file}: uvicorn has already
        # percent-decoded the path, so an encoded "/" makes an extra segment and falls through.
        parts = path[len(PREFIX) :].split("/")
        if len(parts) != 6 or parts[1] != "versions" or parts[3] != "files" or not parts[2].isascii():
            return False
        if not parts[2].isdigit():
            return False
        found = self.catalog.cached_artifact(parts[0], int(parts[2]), parts[4], parts[5])
        if found is None:
            return False
        scope["route"] = self.file_route
        await BlobResponse(self.catalog.blob(found), self.blobs)(scope, receive, send)
        return True

    async def _manifest(self, scope: Scope, send: Send, path: str) -> bool:
        model = path[len(PREFIX) : -len(SUFFIX)]
        if not MODEL_NAME.fullmatch(model):
            return False
        query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        channel = query.get("channel", "stable")
        client_id = query.get("client_id")
        if not CHANNEL_NAME.fullmatch(channel) or (client_id is not None and len(client_id) > MAX_CLIENT_ID):
            return False
        resolved = self.catalog.cached_channel_manifest(model, channel, client_id)
        if resolved is None:
            return False
        accept_encoding = if_none_match = None
        for key, value in scope["headers"]:
            if key == b"if-none-match":
                if_none_match = value.decode("latin-1")
            elif key == b"accept-encoding":
                accept_encoding = value.decode("latin-1")
        status, headers, body = manifest_answer(resolved.manifest, accept_encoding, if_none_match, NO_CACHE)
        scope["route"] = self.manifest_route
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        count_manifest(model, resolved.manifest.version, resolved.channel_label, status)
        return True
