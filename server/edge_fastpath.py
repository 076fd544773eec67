"""A pure-ASGI shortcut for the device update route, the service's hottest POST.

``POST /v1/federations/{model}/tasks/{task_id}/updates`` is what a fleet of devices sends
every round. Walking FastAPI's router to it (route matching, the included routers' wrappers,
the exception middleware's per-request setup) cost ~0.09 ms of event-loop CPU per update,
as much as the route's own work for the digits CNN (benchmarks/edge_ingest.md). This
middleware sits where ``server/fastpath.py`` does — inside the metrics, CORS and body-limit
middleware, so those see and shape these requests exactly as before — matches the route's
path and method itself and calls the very function the FastAPI route calls
(``federations.receive_update``): same checks, same answers, same counters. The FastAPI
route stays declared, so OpenAPI documents it (and it serves anything that reaches it).

Errors the route would leave to the app's exception handlers (the store unavailable: 503;
anything unexpected: a JSON 500) are given to the same handlers here.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from registry.edge import EdgeStore
from server.routers.federations import receive_update

PREFIX = "/v1/federations/"
SUFFIX = "/updates"


class EdgeFastPath:
    """Answers ``POST .../tasks/{task_id}/updates`` itself; passes everything else on."""

    def __init__(self, app: ASGIApp, edge: EdgeStore, max_update_bytes: int, route: BaseRoute,
                 exception_handlers: dict):
        self.app = app
        self.edge = edge
        self.limit = max_update_bytes
        self.route = route
        self.handlers = exception_handlers  # the app's own dict (errors.install fills it)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path.endswith(SUFFIX) and path.startswith(PREFIX):
                # {model}/tasks/{task_id}: each a non-empty segment, as the route's [^/]+ (uvicorn
                # has percent-decoded the path: an encoded "/" makes an extra segment, as there)
                parts = path[len(PREFIX):-len(SUFFIX)].split("/")
                if len(parts) == 3 and parts[1] == "tasks" and parts[0] and parts[2]:
                    await self._update(scope, receive, send, parts[0], parts[2])
                    return
        await self.app(scope, receive, send)

    async def _update(self, scope: Scope, receive: Receive, send: Send, model: str, task_id: str) -> None:
        scope["route"] = self.route  # metrics label it with the route's template
        scope["path_params"] = {"model": model, "task_id": task_id}
        try:
            response = await receive_update(self.edge, self.limit, scope, receive, model, task_id)
        except Exception as exc:  # as the app's ExceptionMiddleware / ServerErrorMiddleware would
            handler = self._handler(exc)
            if handler is None:
                raise
            response = await handler(Request(scope, receive, send), exc)
        await response(scope, receive, send)

    def _handler(self, exc: Exception):
        for cls in type(exc).__mro__:
            handler = self.handlers.get(cls)
            if handler is not None:
                return handler
        return None
