"""CORS for the routes browsers are meant to call, and for nothing that needs the admin token.

Browser apps on other origins read manifests and files, predict, enrol and send updates,
telemetry and feedback: those answers carry CORS headers for the configured origins
(``--cors-origin`` / ``POLLINATE_CORS_ORIGINS``, default ``*``). The admin routes (channel
moves and rollbacks, and whatever else depends on ``server.auth.require_admin``) answer no
CORS header to any origin, preflight included, so a page on another origin can never send
them, even to a server whose operator allowed every origin for the public routes (the
default): the admin's own tools are not browsers.

Which routes are admin is read from the routes themselves (their dependencies), once, when
the app is built: a new admin route is covered without being listed here. The same set is
left out of the public ``/openapi.json`` unless ``POLLINATE_OPENAPI_ADMIN`` asks for it
(``hide_from_openapi``): an anonymous reader learns the public API, not where to aim a token.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from server.auth import require_admin


def _depends_on(dependant, call) -> bool:
    return any(d.call is call or _depends_on(d, call) for d in dependant.dependencies)


def admin_routes(routes: Iterable[BaseRoute]) -> list[APIRoute]:
    """The routes that need the admin token (directly or through another dependency)."""
    return [r for r in routes if isinstance(r, APIRoute) and _depends_on(r.dependant, require_admin)]


def hide_from_openapi(app: FastAPI, routes: Iterable[APIRoute]) -> None:
    """Leave ``routes`` out of this app's ``/openapi.json`` (the routes themselves are shared by
    every app of the process, so they are left as they are)."""
    hidden = [(route.path, {m.lower() for m in route.methods or ()}) for route in routes]
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        paths = schema.get("paths", {})
        for path, methods in hidden:
            operations = paths.get(path, {})
            for method in methods:
                operations.pop(method, None)
            if path in paths and not operations:
                del paths[path]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


class PublicCors:
    """``CORSMiddleware`` for every request except those to an admin route (by path and method;
    a preflight by the method it asks for), which go to the app untouched."""

    def __init__(self, app: ASGIApp, admin: Sequence[APIRoute], **cors_options):
        self.app = app
        self.cors = CORSMiddleware(app, **cors_options)
        self.admin: list[tuple[re.Pattern[str], frozenset[str]]] = [
            (route.path_regex, frozenset(route.methods or ())) for route in admin]
        self.admin_methods = frozenset(m for _, methods in self.admin for m in methods)
        self._decided: dict[tuple[str, str], bool] = {}  # (method, path) -> admin: the hot POSTs repeat

    def _admin_request(self, scope: Scope) -> bool:
        method = scope["method"]
        if method == "OPTIONS":  # decided by the method it asks about: not cached
            return self._is_admin(scope)
        if method not in self.admin_methods:
            return False
        key = (method, scope["path"])
        found = self._decided.get(key)
        if found is None:
            if len(self._decided) >= 4096:  # paths are many only when someone makes them up
                self._decided.clear()
            found = self._decided[key] = self._is_admin(scope)
        return found

    def _is_admin(self, scope: Scope) -> bool:
        method: str | None = scope["method"]
        if method == "OPTIONS":  # a preflight: the method it asks about, else any on an admin path
            method = next((value.decode("latin-1").strip().upper() for key, value in scope["headers"]
                           if key == b"access-control-request-method"), None)
        path = scope["path"]
        return any((method is None or method in methods) and pattern.match(path) for pattern, methods in self.admin)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.admin and self._admin_request(scope):
            await self.app(scope, receive, send)
            return
        await self.cors(scope, receive, send)
