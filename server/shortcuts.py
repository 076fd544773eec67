"""A pure-ASGI shortcut for the service's hot POST routes.

Device updates (``POST /v1/federations/{model}/tasks/{task_id}/updates``, what a fleet sends
every round) and field monitoring (``POST /v1/models/{name}/telemetry`` and ``/feedback``)
are the POSTs that arrive by the thousand. Walking FastAPI's router to them (route matching
over the included routers, their wrappers, dependency solving, the exception middleware's
per-request setup) cost 0.09-0.28 ms of event-loop CPU per request, as much as or more than
the routes' own work (benchmarks/results/edge_ingest.md, monitor.md).

``Shortcuts`` sits where ``server/fastpath.py`` does: inside the metrics, CORS and body-limit
middleware, so those see and shape these requests exactly as before. It holds a small table of
(route, handler) pairs: a request whose method and path the route itself matches (the route's own
``path_regex`` and convertors, so the two cannot disagree) is answered by the handler, the
very function the FastAPI route calls, ``handler(scope, receive, **path_params)`` → a
response: same checks, same answers, same counters. The FastAPI routes stay declared, so
OpenAPI documents them (and they serve anything that reaches them).

Errors the route would leave to the app's exception handlers (the store unavailable: 503;
anything unexpected: a JSON 500) are given to the same handlers here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from starlette._utils import get_route_path
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[..., Awaitable[Response]]  # handler(scope, receive, **path_params)


async def read_body(receive: Receive) -> bytes:
    """The whole request body, as Starlette's ``Request.body()`` reads it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


class Shortcuts:
    """Answers the table's routes itself (POST only); passes everything else on."""

    def __init__(self, app: ASGIApp, routes: Sequence[tuple[BaseRoute, Handler]], exception_handlers: dict):
        self.app = app
        # (the route's compiled pattern, its convertors, the route, the handler); Starlette's
        # routes are matched with path_regex over the decoded path, as here
        self.table = [(route.path_regex, route.param_convertors, route, handler)  # type: ignore[attr-defined]
                      for route, handler in routes]
        for route, _ in routes:
            assert "POST" in (getattr(route, "methods", None) or ()), route
        self.handlers = exception_handlers  # the app's own dict (errors.install fills it)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = get_route_path(scope)  # as Starlette's routes: the decoded path past root_path
            for pattern, convertors, route, handler in self.table:
                found = pattern.match(path)
                if found is not None:
                    params = {key: convertors[key].convert(value) for key, value in found.groupdict().items()}
                    await self._answer(scope, receive, send, route, handler, params)
                    return
        await self.app(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive, send: Send, route: BaseRoute, handler: Handler,
                      params: dict) -> None:
        scope["route"] = route  # metrics label it with the route's template
        scope["path_params"] = params
        try:
            response = await handler(scope, receive, **params)
        except Exception as exc:  # as the app's ExceptionMiddleware / ServerErrorMiddleware would
            found = self._handler(exc)
            if found is None:
                raise
            response = await found(Request(scope, receive, send), exc)
        await response(scope, receive, send)

    def _handler(self, exc: Exception):
        for cls in type(exc).__mro__:
            handler = self.handlers.get(cls)
            if handler is not None:
                return handler
        return None
