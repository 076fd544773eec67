"""Field monitoring over HTTP: telemetry and feedback in, the monitor's view out.

``POST /v1/models/{name}/telemetry`` and ``POST /v1/models/{name}/feedback`` take the small
aggregates and labels that devices send (docs/monitoring.md sections 2 and 3; no admin
token). Every sender is untrusted, so the order of refusals puts the cheap ones first: a body
over 64 KiB (or JSON nested or sized past the app's bounds) is refused by the app's
middleware (413/422) before anything here; then the source address's token bucket (per
address, whatever ``client_id`` the body claims: 429 with ``Retry-After``); then the model
name (404); then, when ``monitor_auth`` is ``device``, an enrolled device's token (401);
then the body must be a JSON object (422); then ``registry.monitoring.Monitor`` validates
and merges it on its committer thread, in one transaction with the other batches queued
meanwhile, and the request is answered once that transaction is committed (422 with what is
wrong; nothing stored). A refused batch changes nothing; a batch whose ``batch_id`` was
already counted is answered 202 with ``"duplicate": true`` and not counted again.
Every accepted batch asks the watcher (``server/monitoring.py``) to check the model's alerts
and guardrails soon.

``GET /v1/models/{name}/monitor`` is what ``/dashboard`` draws: the monitor's report (the
``pollinate monitor --json`` shape), its timeline, the channels with their rollout and
shadow, the channel history with the versions the federation's acceptance gate held (each
with its reason), and the guardrails' standing.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import anyio.to_thread
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope

from core.errors import InvalidInput, NotFound
from registry.gate import held_versions, history_with_holds
from server import metrics
from server.monitoring import Watcher, bearer_token, retry_after
from server.names import existing_model_name
from server.schemas import FEEDBACK_BODY, MAX_VERSION, SINCE_PATTERN, TELEMETRY_BODY, ErrorOut, json_body
from server.shortcuts import read_body
from server.state import Services, ServicesDep

router = APIRouter(prefix="/v1/models", tags=["monitoring"])

ModelName = Annotated[str, Path(description="Model name, e.g. digits.")]
REFUSALS = {
    401: {"model": ErrorOut, "description": "Only enrolled devices may send (POLLINATE_MONITOR_AUTH=device):"
          " `Authorization: Bearer <device token>` of a device enrolled for this model."},
    404: {"model": ErrorOut, "description": "No such model."},
    413: {"model": ErrorOut, "description": "The body is over 64 KiB."},
    422: {"model": ErrorOut, "description": "A bad body: what is wrong is in `detail`. Nothing was stored."},
    429: {"model": ErrorOut, "description": "Over the rate limit of this address: retry after `Retry-After` seconds."},
}
ACCEPTED = {"description": "Merged into the version's window (UTC hour); `\"duplicate\": true` when its"
            " `batch_id` was counted before (then not counted again).", "content": {"application/json": {
                "example": {"accepted": True, "window": "2026-12-02T14:00:00Z"}}}}
NO_STORE = {"Cache-Control": "no-store"}
MAX_DRIFT_BUCKETS = 96  # buckets per version whose per-feature drift the monitor view adds


def watcher(app: Any) -> Watcher:
    """The process's watcher (``app`` is the application), made on first use (it loads the
    monitor and numpy)."""
    found = getattr(app.state, "watcher", None)
    if found is None:
        svc: Services = app.state.services
        config = svc.config
        found = app.state.watcher = Watcher(
            svc.store, rate_per_minute=config.telemetry_rate, interval_s=config.monitor_interval_s,
            trusted_proxies=config.trusted_proxies, monitor_auth=config.monitor_auth,
            edge=getattr(app.state, "edge", None))
    return found


class _Accepted(Response):
    """A 202 made without Starlette's header building: it answers every batch (thousands a
    second), and its headers never change."""

    media_type = "application/json"
    HEADERS = ((b"cache-control", b"no-store"), (b"content-type", b"application/json"))

    def __init__(self, body: bytes):
        self.body, self.status_code, self.background = body, 202, None
        self.raw_headers = [*self.HEADERS, (b"content-length", str(len(body)).encode())]


_last_accepted: tuple[str, bytes] = ("", b"")  # (window, body) of the last plain acceptance


def _accepted(result: dict) -> Response:
    """The 202 for an ingested batch: ``{"accepted": true, "window": ...}`` (the body kept for
    the current hour), or the monitor's answer as it is (a duplicate)."""
    global _last_accepted
    window = result.get("window")
    if len(result) == 2 and result.get("accepted") is True and isinstance(window, str):
        if _last_accepted[0] != window:
            _last_accepted = (window, json.dumps(result, separators=(",", ":")).encode())
        return _Accepted(_last_accepted[1])
    return _Accepted(json.dumps(result, separators=(",", ":")).encode())


def _refuse(model: str | None, route: str, reason: str, status: int, detail: str,
            headers: dict[str, str] | None = None) -> JSONResponse:
    metrics.count_monitor_refusal(model, route, reason)
    return JSONResponse({"detail": detail}, status_code=status, headers={**NO_STORE, **(headers or {})})


async def _take(scope: Scope, receive: Receive, name: str, route: str
                ) -> tuple[Watcher, str, dict, tuple[str, str]] | JSONResponse:
    """(watcher, model, body, (address, device)) for a batch that may be ingested, or the
    refusal to send. Whether the model exists is checked by the monitor, in the transaction
    that would store the batch."""
    watch = watcher(scope["app"])
    address = watch.address(scope)
    wait = watch.limiter.take((route, address))
    if wait > 0:
        return _refuse(None, route, "rate_limited", 429, f"too many {route} batches from this address:"
                       f" retry in {retry_after(wait)} s", {"Retry-After": retry_after(wait)})
    try:
        model = existing_model_name(name)
    except NotFound as exc:
        return _refuse(None, route, "not_found", 404, str(exc))
    token = bearer_token(scope)
    device = await watch.device(model, token) if token is not None else None
    if device is None and watch.devices_only:
        detail = ("only enrolled devices may send telemetry and feedback here: Authorization: Bearer <device token>"
                  " (POST /v1/federations/{model}/devices enrols one)" if token is None
                  else f"this token does not belong to a device enrolled for {model!r}")
        return _refuse(None, route, "unauthorized", 401, detail, {"WWW-Authenticate": "Bearer"})
    try:
        body = json.loads(await read_body(receive))
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nesting past the bounds
        return _refuse(None, route, "invalid", 422, "the body must be a JSON object (docs/monitoring.md)")
    if not isinstance(body, dict):
        return _refuse(None, route, "invalid", 422, "the body must be a JSON object (docs/monitoring.md)")
    return watch, model, body, (address, device or "")


async def _ingest(watch: Watcher, model: str, route: str, ingest, body: dict,
                  source: tuple[str, str]) -> JSONResponse | dict:
    """``ingest`` is the monitor's async ingestion: the body waits in its committer's queue and
    this request is answered once the group it joined is committed (the loop never blocks)."""
    try:
        return await ingest(model, body, source=source)
    except NotFound as exc:  # no such model: not a metric label of its own
        return _refuse(None, route, "not_found", 404, str(exc))
    except InvalidInput as exc:
        return _refuse(model, route, "invalid", 422, str(exc))


# Requests normally never reach the two POST routes: server/shortcuts.py answers them before
# FastAPI's routing, with the same functions (receive_telemetry, receive_feedback). The
# declarations document the routes (OpenAPI) and serve any request that reaches the router.
@router.post("/{name}/telemetry", status_code=202, responses={202: ACCEPTED, **REFUSALS},
             openapi_extra=json_body(TELEMETRY_BODY),
             summary="One version's telemetry aggregate since the client's last flush")
async def telemetry(request: Request, name: ModelName) -> JSONResponse:
    """Histograms on the manifest's `monitoring` grid, counts, latency, shadow agreement and
    recent prediction ids; never an input. Batches add up per version and UTC hour."""
    return await receive_telemetry(request.scope, request.receive, name)


async def receive_telemetry(scope: Scope, receive: Receive, name: str) -> JSONResponse:
    """The telemetry route's work, from the raw ASGI scope (the route and the shortcut both call it)."""
    taken = await _take(scope, receive, name, "telemetry")
    if isinstance(taken, JSONResponse):
        return taken
    watch, model, body, source = taken
    result = await _ingest(watch, model, "telemetry", watch.monitor.ingest_telemetry_async, body, source)
    if isinstance(result, JSONResponse):
        return result
    if not result.get("duplicate"):  # a retry of a batch counted before changes nothing
        predictions = body.get("predictions")
        metrics.count_telemetry(model, predictions if isinstance(predictions, int) else 0)
        watch.accepted(model)
    return _accepted(result)


@router.post("/{name}/feedback", status_code=202, responses={202: ACCEPTED, **REFUSALS},
             openapi_extra=json_body(FEEDBACK_BODY),
             summary="What a prediction's answer really was")
async def feedback(request: Request, name: ModelName) -> JSONResponse:
    """``{"version", "prediction", "label"}``, or ``{"prediction_id", "label"}`` for a prediction
    the client listed in a telemetry batch's `recent`. Labels are the manifest's `labels`
    strings (numbers for regression)."""
    return await receive_feedback(request.scope, request.receive, name)


async def receive_feedback(scope: Scope, receive: Receive, name: str) -> JSONResponse:
    """The feedback route's work, from the raw ASGI scope (the route and the shortcut both call it)."""
    taken = await _take(scope, receive, name, "feedback")
    if isinstance(taken, JSONResponse):
        return taken
    watch, model, body, source = taken
    result = await _ingest(watch, model, "feedback", watch.monitor.ingest_feedback_async, body, source)
    if isinstance(result, JSONResponse):
        return result
    if not result.get("duplicate"):
        metrics.count_feedback(model)
        watch.accepted(model)
    return _accepted(result)


@router.get("/{name}/monitor", responses={404: REFUSALS[404], 422: REFUSALS[422]},
            summary="The monitor's report and timeline of a model (what /dashboard draws)")
async def monitor(
    request: Request,
    svc: ServicesDep,
    name: ModelName,
    version: Annotated[int | None, Query(ge=1, le=MAX_VERSION, description="Only this version.")] = None,
    since: Annotated[str | None, Query(max_length=40, pattern=SINCE_PATTERN,
                                       description="ISO date or time, or a span back (7d): windows from then on.")] = None,
    bucket: Annotated[Literal["hour", "day", "month"], Query(description="The timeline's step.")] = "hour",
) -> JSONResponse:
    model = existing_model_name(name)
    await svc.catalog.model(model)
    watch = watcher(request.app)
    body = await anyio.to_thread.run_sync(lambda: _monitor_view(svc, watch, model, version, since, bucket))
    return JSONResponse(body, headers=NO_STORE)


def _bucket_span(label: str, bucket: str) -> tuple[float, float] | None:
    """The first and last hour (unix seconds) of a timeline bucket: windows are UTC hours."""
    try:
        if bucket == "hour":
            start = datetime.fromisoformat(label.replace("Z", "+00:00"))
            return start.timestamp(), start.timestamp()
        if bucket == "day":
            start = datetime.fromisoformat(label).replace(tzinfo=UTC)
            return start.timestamp(), (start + timedelta(hours=23)).timestamp()
        year, month = (int(part) for part in label.split("-"))
        start = datetime(year, month, 1, tzinfo=UTC)
        following = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        return start.timestamp(), (following - timedelta(hours=1)).timestamp()
    except ValueError:
        return None


def _feature_drift(watch: Watcher, model: str, timeline: dict, bucket: str) -> None:
    """Add each row's PSI per feature (``features``) where the timeline gives only the largest:
    the dashboard draws every feature over time. One report per bucket, the newest
    MAX_DRIFT_BUCKETS of each version."""
    for version, rows in (timeline.get("versions") or {}).items():
        for row in rows[-MAX_DRIFT_BUCKETS:]:
            if "features" in row or not row.get("predictions"):
                continue
            span = _bucket_span(str(row.get("bucket")), bucket)
            if span is None:
                continue
            numbers = watch.monitor.report(model, version=int(version), since=span[0], until=span[1])
            drift = (numbers["versions"].get(str(version)) or {}).get("drift") or {}
            row["features"] = {name: d["psi"] for name, d in drift.items() if name != "prediction"}


def _monitor_view(svc: Services, watch: Watcher, model: str, version: int | None, since: str | None,
                  bucket: str) -> dict[str, Any]:
    store = svc.store
    report = watch.monitor.report(model, version=version, since=since)
    timeline = watch.monitor.timeline(model, version=version, since=since, bucket=bucket)
    _feature_drift(watch, model, timeline, bucket)
    channels = {name: state.to_dict() for name, state in store.list_channels(model).items()}
    info = next((m for m in store.list_models() if m["name"] == model), None) or {}
    return {
        "model": model,
        "latest_version": info.get("latest_version"),
        "bucket": bucket,
        "report": report,
        "timeline": timeline,
        "channels": channels,
        # channel moves and the versions the federation's gate held (published, channel not
        # moved: registry/gate.py), in time order
        "history": history_with_holds(store, model)[-50:],
        "held": held_versions(store, model)[-20:],
        "guardrails": watch.monitor.guardrail_status(model),
    }
