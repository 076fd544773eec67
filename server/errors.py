"""Store errors become HTTP answers with a JSON ``detail``, never a 500.

Routes let :mod:`core.errors` propagate; these handlers choose the status. Whatever
slips through anyway is logged and answered with a JSON 500 (a bug to fix, not a page of
HTML).

Every refusal has the one shape the OpenAPI document promises (``ErrorOut``): ``detail`` is a
sentence. A request FastAPI refuses before the route runs (a query parameter of the wrong
type, a body that does not match its model) says what is wrong in ``detail`` too, with the
list of problems beside it in ``errors`` (``ValidationErrorOut``), instead of FastAPI's own
shape (a list in ``detail``), which contradicted the schema. ``document`` makes the OpenAPI
document say so, and lists the refusals that the app's middleware may give any request with a
body (413 too large, 422 over the JSON bounds, 503 too many uploads at once).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from core.errors import InvalidInput, NotFound, PollinateError
from server.schemas import ErrorOut, ValidationErrorOut, ValidationItemOut

log = logging.getLogger("pollinate.server")


VALIDATION_KEYS = ("type", "loc", "msg")  # never the input: it may be 64 KiB, or a NaN JSON cannot hold
MAX_LISTED = 20  # problems listed in one answer


def _where(loc) -> str:
    """``["body", "rows", 0]`` → "rows.0"; ``["query", "version"]`` → "query parameter version"."""
    where, *rest = [str(part) for part in loc] or ["request"]
    if where == "body":
        return ".".join(rest) or "body"
    return f"{where} parameter {'.'.join(rest)}" if rest else where


def validation_body(errors: list[dict]) -> str:
    """``{"detail": "version: Input should be a valid integer; …", "errors": [...]}``."""
    items = [{k: (list(e[k]) if k == "loc" else str(e[k])) for k in VALIDATION_KEYS if k in e} for e in errors]
    items = items[:MAX_LISTED]
    detail = "; ".join(f"{_where(i.get('loc', ()))}: {i.get('msg', 'invalid')}" for i in items) or "invalid request"
    return json.dumps({"detail": detail, "errors": items}, default=str)


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return Response(validation_body(list(exc.errors())), status_code=422, media_type="application/json")

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(InvalidInput)
    async def invalid(request: Request, exc: InvalidInput) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(PollinateError)
    async def unavailable(request: Request, exc: PollinateError) -> JSONResponse:
        # The store could not be read or written (locked for 30 s, disk full): retry later.
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error (logged on the server)"}, status_code=500)


# What the app's middleware may answer any request with a body (server/limits.py).
BODY_REFUSALS = {
    "400": "The body could not be read as text (FastAPI's own refusal of bytes that are not UTF-8 JSON).",
    "413": "The body is over the server's limit (64 KiB; a device update: POLLINATE_MAX_UPDATE_BYTES).",
    "422": "The JSON body nests too deep, or has too long an array or string (docs/deployment.md), or is"
           " otherwise refused: `detail` says why.",
    "503": "The server is receiving as many uploads as it takes at once: retry after `Retry-After` seconds.",
}


def document(app: FastAPI) -> None:
    """Make ``app.openapi()`` describe the answers as they are: validation refusals as
    ``ValidationErrorOut`` (not FastAPI's ``HTTPValidationError``), and the middleware's
    refusals on every operation that takes a body."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        for name, model in (("ErrorOut", ErrorOut), ("ValidationErrorOut", ValidationErrorOut),
                            ("ValidationItemOut", ValidationItemOut)):
            if name not in components:
                found = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(found.pop("$defs", {}))
                components[name] = found
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
        invalid = {"application/json": {"schema": {"$ref": "#/components/schemas/ValidationErrorOut"}}}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                found = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
                if found.get("$ref", "").endswith("/HTTPValidationError"):
                    responses["422"] = {"description": "The request does not match this operation's parameters"
                                        " or body: `detail` says how.", "content": invalid}
                if "requestBody" in operation:
                    for status, description in BODY_REFUSALS.items():
                        responses.setdefault(status, {"description": description, "content": error})
                if "security" in operation:  # openapi_extra's list is appended to the dependency's: once each
                    operation["security"] = [dict(s) for s in {json.dumps(s, sort_keys=True): s
                                                               for s in operation["security"]}.values()]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
