"""The FastAPI application: routers, middleware and error handlers, wired once.

``create_app(config)`` builds an app for one process (tests, embedding);
``app_from_env`` is the factory uvicorn imports in every worker (``--factory``), reading
the same config from environment variables that ``pollinate serve`` sets.

Middleware, outermost first, all pure ASGI (no per-request task, no body copies):
metrics (time and count everything, refusals included) → CORS, for every route but the
admin ones (``server/cors.py``; so browsers can read refusals too) → the cap on uploads in
flight (503) → body size limit and JSON shape bounds (device updates excepted: their route
streams them against its own limit; ``server/limits.py``) → the shortcut for the hot POSTs:
device updates, telemetry, feedback (``server/shortcuts.py``) → the shortcut for cached
manifests and known files (``server/fastpath.py``) → the routers. The read timeouts live a
layer below, in uvicorn's protocol (``server/protocol.py``).

The admin routes are left out of ``/openapi.json`` unless ``POLLINATE_OPENAPI_ADMIN`` is set
(they still work; ``pollinate models promote --server`` and curl need no schema).
"""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, FastAPI
from starlette.routing import BaseRoute

import server
from registry.edge import EdgeStore
from server import errors
from server.addresses import ClientAddress
from server.config import ServerConfig
from server.cors import PublicCors, admin_routes, hide_from_openapi
from server.fastpath import FastPath
from server.limits import BodyLimitMiddleware, RateLimiter
from server.metrics import MetricsMiddleware
from server.routers import channels, federations, files, health, metrics, models, monitoring, predict, web
from server.shortcuts import Shortcuts
from server.state import Services

EXPOSED_HEADERS = ["ETag", "Content-Length", "Content-Range", "Content-Encoding", "Accept-Ranges",
                   "X-Pollinate-Cache", "X-Pollinate-Batch", "X-Pollinate-Version"]
ALLOWED_HEADERS = ["Authorization", "Content-Type", "If-None-Match", "If-Range", "Range"]


def create_app(config: ServerConfig) -> FastAPI:
    app = FastAPI(
        title="Pollinate distribution service",
        version="1",
        description=server.__doc__,
        openapi_tags=[
            {"name": "models", "description": "Models, versions and manifests."},
            {"name": "files", "description": "Immutable, content-addressed files."},
            {"name": "channels", "description": "Channel pointers, staged rollout, rollback (admin)."},
            {"name": "monitoring", "description": "Telemetry and feedback from devices (no raw input), and the"
             " monitor's view of a model (docs/monitoring.md)."},
            {"name": "federations", "description": "The device protocol: browsers and phones enrol, fetch a"
             " task and its base weights, and send their update (docs/device-protocol.md)."},
        ],
    )
    app.state.services = Services.build(config)
    app.state.edge = EdgeStore(app.state.services.store)  # one per process: its writes share transactions
    app.state.client_address = ClientAddress(config.trusted_proxies)  # who is asking (server/addresses.py)
    app.state.enrol_limiter = RateLimiter(config.enrol_rate)  # device enrolments per address
    errors.install(app)
    # the device protocol first: its update route is the hottest path the router walks (routes
    # are matched in order; benchmarks/edge_ingest.md has the cost of walking past the others)
    routers = [m.router for m in (federations, health, models, predict, files, channels, monitoring, metrics, web)]
    for router in routers:
        app.include_router(router)
    app.mount(web.WEB_PREFIX, web.WebClientFiles(directory=config.web_client, html=True, check_dir=False),
              name="web_client")
    admin = admin_routes(route for router in routers for route in router.routes)
    errors.document(app)
    if not config.openapi_admin:
        hide_from_openapi(app, admin)

    svc: Services = app.state.services
    app.add_middleware(
        FastPath,
        catalog=svc.catalog,
        blobs=svc.blobs,
        manifest_route=_route(models.router, models.CHANNEL_MANIFEST_PATH, "GET"),
        file_route=_route(files.router, files.router.prefix + files.FILE_PATH, "GET"),
    )
    monitored = monitoring.router.prefix
    app.add_middleware(
        Shortcuts,
        routes=[  # (route, the function it calls): answered before FastAPI's routing
            (_route(federations.router, federations.router.prefix + federations.UPDATE_PATH, "POST"),
             partial(federations.receive_update, app.state.edge, config.max_update_bytes)),
            (_route(monitoring.router, monitored + "/{name}/telemetry", "POST"), monitoring.receive_telemetry),
            (_route(monitoring.router, monitored + "/{name}/feedback", "POST"), monitoring.receive_feedback),
        ],
        exception_handlers=app.exception_handlers,
    )
    # device updates stream past the cap, against their own limit (max_update_bytes)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes, exempt=federations.UPDATES_PATH,
                       max_uploads=config.max_uploads)
    app.add_middleware(
        PublicCors,
        admin=admin,
        allow_origins=list(config.cors_origins),
        allow_methods=["GET", "HEAD", "POST", "OPTIONS"],  # PUT is admin only
        allow_headers=ALLOWED_HEADERS,
        expose_headers=EXPOSED_HEADERS,
        max_age=600,
    )
    app.add_middleware(MetricsMiddleware)
    return app


def _route(router: APIRouter, path: str, method: str) -> BaseRoute:
    """The route object a shortcut labels its requests with (metrics use its template)."""
    return next(r for r in router.routes if getattr(r, "path", None) == path and method in getattr(r, "methods", ()))


def app_from_env() -> FastAPI:
    """uvicorn's factory for worker processes: ``server.app:app_from_env --factory``."""
    return create_app(ServerConfig.from_env())
