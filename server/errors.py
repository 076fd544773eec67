"""Store errors become HTTP answers with a JSON ``detail``, never a 500.

Routes let :mod:`core.errors` propagate; these handlers choose the status. Whatever
slips through anyway is logged and answered with a JSON 500 (a bug to fix, not a page of
HTML).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from core.errors import InvalidInput, NotFound, PollinateError

log = logging.getLogger("pollinate.server")


VALIDATION_KEYS = ("type", "loc", "msg", "input")


def validation_body(errors: list[dict]) -> str:
    """FastAPI's 422 list, minus what cannot be JSON: a NaN or Infinity the client sent is
    echoed as ``input`` and would make the default handler fail with a 500."""
    detail = [{k: e[k] for k in VALIDATION_KEYS if k in e} for e in errors]
    try:
        return json.dumps({"detail": detail}, allow_nan=False, default=str)
    except ValueError:
        return json.dumps({"detail": [{k: v for k, v in e.items() if k != "input"} for e in detail]}, default=str)


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
