"""The device protocol: browsers and phones enrol, fetch a task and its base weights, train,
and post their update (``docs/device-protocol.md`` is the page a client is written from).

The rules live in the store (``registry/edge.py``): an edge gateway opens a task there, this
router hands it to devices and records their updates, and the gateway reads them back. So
the same validation runs here and in the gateway, and an update that got its 202 is on disk
and in SQLite before the answer leaves: a server killed with -9 loses none and counts none
twice.

Every refusal is a JSON ``detail`` with the protocol's status (and its ``reason``, so that a
client tells a stale round from a duplicate without reading the sentence), counted in ``/metrics`` per
model and reason and, once the model is known, in the store (``/status``): under the task's
federation and round when the request named a live task, else as unattributed (federation
'', round 0). Store calls block (SQLite, fsync), so each route runs them in the thread pool,
as the other routers do.

Enrolment is open by default (``POLLINATE_ENROL_TOKEN`` closes it), so it is rate-limited by
network address (``POLLINATE_ENROL_RATE`` a minute, a minute's worth of burst; the address as
``server/addresses.py`` resolves it, trusted proxies included): one source cannot mint
thousands of devices to outvote a round. Past the rate: 429 with ``Retry-After``, reason
``rate_limited``, counted like any refusal.

An update body is the one big body this service takes: the app's 64 KiB cap skips the
updates route (``UPDATES_PATH``), which streams the body against
``POLLINATE_MAX_UPDATE_BYTES`` and stops reading as soon as it is over.
"""

from __future__ import annotations

import ctypes
import hmac
import json
import re
import time
from typing import Annotated
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from registry.edge import DEVICE_KINDS, DTYPES, EdgeRefusal, EdgeStore, EdgeTask, check_update_params
from server.config import ENV_ENROL_RATE, ENV_ENROL_TOKEN, ENV_MAX_UPDATE_BYTES
from server.limits import retry_after
from server.metrics import count_edge_enrolment, count_edge_refusal, count_edge_update
from server.schemas import EdgeErrorOut, EnrolIn, EnrolOut, FederationStatusOut, TaskOut, UpdateAcceptedOut
from server.state import ServicesDep

router = APIRouter(prefix="/v1/federations", tags=["federations"])

# The route whose body the app-wide size cap leaves to this router (server/limits.py).
UPDATES_PATH = re.compile(r"^/v1/federations/[^/]+/tasks/[^/]+/updates$")

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="pollinate-devices"'}
NO_STORE = {"Cache-Control": "no-store"}

device_bearer = HTTPBearer(auto_error=False, scheme_name="DeviceToken",
                           description="The token POST /v1/federations/{model}/devices returned.")
enrol_bearer = HTTPBearer(auto_error=False, scheme_name="EnrolToken",
                          description=f"The server's {ENV_ENROL_TOKEN}, when it sets one (else none is needed).")

ModelName = Annotated[str, Path(description="Model name, e.g. digits.")]
TaskId = Annotated[str, Path(description="task_id from GET .../task.")]
DeviceCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(device_bearer)]
EnrolCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(enrol_bearer)]


def _refusals(*statuses: int) -> dict:
    described = {
        401: "No token, a wrong one, or one enrolled for another model: enrol (again) and keep the token.",
        404: "No such model, or no such task for it: fetch the current task.",
        409: "Stale (the task's round closed or passed its deadline: fetch the task again) or duplicate"
             " (this device already sent its update for this task: wait for the next round).",
        413: f"The body is over the server's limit ({ENV_MAX_UPDATE_BYTES}).",
        422: "Wrong length, NaN or infinite values, L2 norm over the bound, bad example count or dtype"
             " (or, on enrolment, a body that is not a JSON object).",
        429: f"Too many enrolments from this address ({ENV_ENROL_RATE} a minute): retry after `Retry-After` seconds.",
    }
    return {s: {"model": EdgeErrorOut, "description": described[s]} for s in statuses}


UPDATE_REQUEST = {
    "parameters": [
        {"name": "examples", "in": "query", "required": True,
         "description": "How many examples the device trained on (weights the update in the aggregate).",
         "schema": {"type": "integer", "minimum": 1, "maximum": 10_000_000}},
        {"name": "dtype", "in": "query", "required": False,
         "description": "The body's value type (float16 halves the upload).",
         "schema": {"type": "string", "enum": list(DTYPES), "default": "float32"}},
    ],
    "requestBody": {
        "required": True,
        "description": "local − base: the task's tensors, in `weights` order, concatenated as little-endian"
                       " float32 (or float16) values; `size` values in all.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
}
ENROL_REQUEST = {
    "requestBody": {
        "required": False,
        "content": {"application/json": {"schema": EnrolIn.model_json_schema()}},
    },
    # the enrol token is needed only where the server sets one: either way is a valid request
    "security": [{}, {"EnrolToken": []}],
}
WEIGHTS_RESPONSE = {
    200: {"description": "The task's base weights: its tensors in `weights` order, little-endian float32,"
                         " concatenated (4 × size bytes).",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
}


async def edge_store(request: Request) -> EdgeStore:
    """The app's one EdgeStore (``create_app`` builds it): its writers share transactions."""
    return request.app.state.edge


EdgeDep = Annotated[EdgeStore, Depends(edge_store)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials is not None else None


def _counted(edge: EdgeStore, model: str, action, *args):
    """Run `action` (blocking); a refusal it raises is counted in the store as unattributed
    (no task named), the model being known by then unless the refusal says it is not."""
    try:
        return action(*args)
    except EdgeRefusal as refusal:
        if refusal.reason != "unknown_model":
            edge.count_refusal(model, refusal.reason, 0)
        raise


def _refused(refusal: EdgeRefusal, model: str) -> JSONResponse:
    """The JSON answer to a refusal, counted in /metrics (the store counted it already)."""
    count_edge_refusal(None if refusal.reason == "unknown_model" else model, refusal.reason)
    headers = dict(CHALLENGE) if refusal.status == 401 else {}
    if refusal.status == 413:
        headers["Connection"] = "close"  # the rest of the body is never read
    if refusal.retry_after_s is not None:
        headers["Retry-After"] = retry_after(refusal.retry_after_s)
    return JSONResponse({"detail": refusal.detail, "reason": refusal.reason}, status_code=refusal.status,
                        headers=headers)


def _enrol_kind(body: bytes) -> str:
    """The device kind from an optional JSON body; an unknown kind is recorded as 'device'."""
    if not body.strip():
        return "device"
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise EdgeRefusal("bad_enrolment", 'the enrolment body must be JSON, e.g. {"kind": "phone"}, or empty') from None
    if not isinstance(payload, dict) or not isinstance(payload.get("kind", "device"), str | None):
        raise EdgeRefusal("bad_enrolment", 'the enrolment body must be a JSON object like {"kind": "phone"}')
    kind = payload.get("kind") or "device"
    return kind if kind in DEVICE_KINDS else "device"


# --------------------------------------------------------------------------- routes


@router.post(
    "/{model}/devices",
    status_code=201,
    response_model=EnrolOut,
    responses=_refusals(401, 404, 422, 429),
    openapi_extra=ENROL_REQUEST,
    summary="Enrol a device: its id and the token for every other call",
)
async def enrol(request: Request, svc: ServicesDep, edge: EdgeDep, model: ModelName,
                credentials: EnrolCredentials) -> EnrolOut | Response:
    """Enrol once and keep the token (it is stored hashed and never shown again). When the
    server sets ``POLLINATE_ENROL_TOKEN``, send it as ``Authorization: Bearer``. At most
    ``POLLINATE_ENROL_RATE`` enrolments a minute come from one address (429 past it)."""
    try:
        body = await request.body()
    except ClientDisconnect:
        return Response(status_code=400)
    address = request.app.state.client_address(request.scope)
    limiter = request.app.state.enrol_limiter

    def enrol_device() -> tuple[str, str, str]:
        edge.require_model(model)  # an unknown model is 404 before it costs a token
        wait = limiter.take(address)
        if wait > 0:
            raise EdgeRefusal("rate_limited", f"too many enrolments from this address: retry in"
                                              f" {retry_after(wait)} s ({ENV_ENROL_RATE})", retry_after_s=wait)
        expected = svc.config.enrol_token
        given = _token(credentials)
        if expected and not (given and hmac.compare_digest(given.encode(), expected.encode())):
            raise EdgeRefusal("unauthorized", "enrolling a device on this server needs its enrol token:"
                                              f" Authorization: Bearer <{ENV_ENROL_TOKEN}>")
        kind = _enrol_kind(body)
        return (kind, *edge.enrol(model, kind))

    try:
        kind, device_id, token = await run_in_threadpool(_counted, edge, model, enrol_device)
    except EdgeRefusal as refusal:
        return _refused(refusal, model)
    count_edge_enrolment(model, kind)
    return EnrolOut(device_id=device_id, token=token)


@router.get(
    "/{model}/task",
    response_model=TaskOut,
    responses={204: {"description": "No round is open for this device: poll again later."},
               **_refusals(401, 404)},
    summary="The task this device should train for now (204: none)",
)
async def current_task(edge: EdgeDep, model: ModelName, credentials: DeviceCredentials) -> Response:
    """The newest open round this device has not contributed to yet (several gateways share
    the devices: it gets the least served one)."""

    def find() -> EdgeTask | None:
        edge.require_model(model)
        return edge.task_for(model, edge.authenticate(model, _token(credentials)))

    try:
        task = await run_in_threadpool(_counted, edge, model, find)
    except EdgeRefusal as refusal:
        return _refused(refusal, model)
    if task is None:
        return Response(status_code=204, headers=NO_STORE)
    return JSONResponse(task.to_device(), headers=NO_STORE)


def _refuse_in_round(edge: EdgeStore, task: EdgeTask, refusal: EdgeRefusal) -> EdgeRefusal:
    edge.count_refusal(task.model, refusal.reason, task.round, task.federation)
    return refusal


@router.get(
    "/{model}/tasks/{task_id}/weights",
    response_class=FileResponse,
    responses={**WEIGHTS_RESPONSE, **_refusals(401, 404, 409)},
    summary="The task's base weights (flat little-endian float32)",
)
async def task_weights(edge: EdgeDep, model: ModelName, task_id: TaskId, credentials: DeviceCredentials) -> Response:
    """Load the model files of ``base_version``, set these weights, train, and send
    local − base. They are the aggregate of the last round, which may be newer than any
    published version."""

    def locate():
        _, task = _counted(edge, model, edge.admit, model, _token(credentials), task_id)
        path = edge.base_path(task.task_id)
        try:
            edge.check_open(task)
            if not path.is_file():  # the gateway freed the files of a finished round
                raise EdgeRefusal("stale", f"task {task.task_id} is over: fetch the current task")
        except EdgeRefusal as refusal:
            raise _refuse_in_round(edge, task, refusal) from None
        return path

    try:
        path = await run_in_threadpool(locate)
    except EdgeRefusal as refusal:
        return _refused(refusal, model)
    return FileResponse(path, media_type="application/octet-stream",
                        headers={"Cache-Control": "private, max-age=86400"})


class LeanRoute(APIRoute):
    """A route FastAPI documents as usual but calls without its per-request machinery: no
    dependency solving, parameter validation, exception wrapping or response-model encoding
    (measured on a route that only reads a 150 KB body: 0.36 ms of CPU a request with FastAPI,
    0.19 as a plain ASGI app). The endpoint takes the Request and its path parameters as
    strings and returns a Response; errors it raises still reach the app's handlers
    (ExceptionMiddleware)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in self.methods:
            await super().handle(scope, receive, send)  # 405, as FastAPI answers it
            return
        response = await self.endpoint(Request(scope, receive, send), **scope["path_params"])
        await response(scope, receive, send)


_allocator_tuned = False
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def _keep_freed_memory() -> None:
    """Let glibc keep the memory big request bodies pass through.

    uvicorn hands a body over in 64–256 KiB pieces, each a fresh allocation freed soon after.
    glibc gives memory at the top of its heap back to the system once 128 KiB of it is free
    (and serves bigger blocks from fresh mappings), so every update faults its whole size in
    again: ~700 page faults, 1.5 ms of CPU, for a 4 MB update. (A route that joins the body
    into one bytes object raises those thresholds by accident — glibc adapts them to the
    biggest block freed; ours reads into its own buffers and never does.) Keep up to 64 MiB
    free instead (the process's allocator: this route is why it needs it). A no-op where the C
    library has no mallopt (macOS; musl ignores it)."""
    global _allocator_tuned
    _allocator_tuned = True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's most
    mallopt(M_TRIM_THRESHOLD, 64 << 20)


async def post_update(request: Request, model: ModelName, task_id: TaskId) -> Response:
    """202 means recorded durably and counted once. Every check that needs no body (token,
    task, round still open, ``dtype``, ``examples``, declared length) runs before the body
    is read, so a doomed upload is refused early."""
    # Requests normally never get here: server/shortcuts.py answers them before FastAPI's
    # routing, with the same function. This declaration documents the route (OpenAPI) and
    # serves any request that reaches the router anyway.
    return await receive_update(request.app.state.edge, request.app.state.services.config.max_update_bytes,
                                request.scope, request.receive, model, task_id)


async def receive_update(edge: EdgeStore, limit: int, scope: Scope, receive: Receive, model: str,
                         task_id: str) -> Response:
    """The update route's work, from the raw ASGI scope (``post_update`` and the fast path
    both call it, so they cannot drift): admit, stream the body in, accept, answer."""
    # The service's hot path, kept lean (benchmarks/edge_ingest.py): the query and headers are
    # read from the scope (no Request, no dependency), a device and task this process already
    # knows are admitted without a store read or a thread hop (EdgeStore.admit_known), the body
    # streams into page-aligned memory of the task's size (no joining of chunks, no copy on its
    # way to an O_DIRECT disk), the checks, the append and the commit run on the store's
    # committer thread with the others of their batch (no thread hop per update, no numpy on
    # the loop), and the answer is written as JSON directly (the response model documents it).
    started = time.perf_counter()
    if not _allocator_tuned:
        _keep_freed_memory()
    dtype, examples = "float32", None
    if scope["query_string"]:  # as Starlette's query_params: the last value of a repeated key wins
        for key, value in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True):
            if key == "dtype":
                dtype = value
            elif key == "examples":
                examples = value
    authorization = declared = None
    for key, value in scope["headers"]:  # as Starlette's Headers.get: the first of a repeated header
        if key == b"authorization":
            if authorization is None:
                authorization = value.decode("latin-1")
        elif key == b"content-length" and declared is None:
            declared = value.decode("latin-1")
    token = _bearer_token(authorization)
    if declared is not None and not declared.isdigit():
        declared = None

    admitted = None
    if dtype in DTYPES and (declared is None or int(declared) <= limit):
        admitted = edge.admit_known(model, token, task_id)
        if admitted is not None:
            try:
                check_update_params(dtype, examples)
            except EdgeRefusal:
                admitted = None  # refused below, counted
    if admitted is None:
        def admit() -> tuple[str, EdgeTask]:
            device_id, task = _counted(edge, model, edge.admit, model, token, task_id)
            try:
                edge.check_open(task)
                check_update_params(dtype, examples)
                if declared is not None and int(declared) > limit:
                    raise EdgeRefusal("too_large", _too_large(limit))
            except EdgeRefusal as refusal:
                raise _refuse_in_round(edge, task, refusal) from None
            return device_id, task

        try:
            admitted = await run_in_threadpool(admit)
        except EdgeRefusal as refusal:
            return _refused(refusal, model)
    device_id, task = admitted

    body = edge.update_body(task, dtype)
    try:
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return Response(status_code=400)  # the client left: nobody is listening; nothing was recorded
            chunk = message.get("body", b"")
            if chunk:
                if body.length + len(chunk) > limit:
                    refusal = EdgeRefusal("too_large", _too_large(limit))
                    await run_in_threadpool(_refuse_in_round, edge, task, refusal)
                    return _refused(refusal, model)
                body.append(chunk)
            if not message.get("more_body", False):
                break
        try:
            accepted, update, times = await edge.accept_async(task, device_id, body, dtype=dtype, examples=examples)
        except EdgeRefusal as refusal:  # accept_async() counted it under the task's round
            return _refused(refusal, model)
        count_edge_update(model, body.length, started, times, time.perf_counter())
    finally:
        body.release()
    # UpdateAcceptedOut, written out: the task id is hex, the norm a finite float (its repr is JSON)
    answer = (f'{{"task_id":"{task.task_id}","round":{task.round},"accepted":{accepted},'
              f'"norm":{float(update.norm)!r},"clipped":{"true" if update.clipped else "false"}}}')
    return Response(answer.encode(), status_code=202, media_type="application/json")


UPDATE_PATH = "/{model}/tasks/{task_id}/updates"
router.add_api_route(
    UPDATE_PATH,
    post_update,
    methods=["POST"],
    status_code=202,
    response_model=UpdateAcceptedOut,
    responses=_refusals(401, 404, 409, 413, 422),
    openapi_extra={**UPDATE_REQUEST, "security": [{"DeviceToken": []}]},
    summary="Send this device's update for a task (local − base)",
    route_class_override=LeanRoute,
)


def _bearer_token(authorization: str | None) -> str | None:
    """The credentials of an ``Authorization: Bearer`` header (as HTTPBearer reads it)."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        return None
    return credentials.strip() or None


def _too_large(limit: int) -> str:
    return f"the update is over this server's limit of {limit} bytes ({ENV_MAX_UPDATE_BYTES})"


@router.get(
    "/{model}/status",
    response_model=FederationStatusOut,
    responses=_refusals(404),
    summary="The model's current edge round: open?, updates accepted, refusals by reason",
)
async def federation_status(edge: EdgeDep, model: ModelName) -> FederationStatusOut | Response:
    def read() -> dict:
        edge.require_model(model)
        return edge.status(model)

    try:
        status = await run_in_threadpool(read)
    except EdgeRefusal as refusal:
        return _refused(refusal, model)
    return JSONResponse(FederationStatusOut(**status).model_dump(), headers=NO_STORE)
