"""``POST /v1/models/{name}/predict``: the server computes what the device would have.

For clients that cannot run the model themselves (and for products that want an answer from
the server anyway): the version is the one the client's manifest would name (same channel,
same rollout cohort), the numbers come from its ``tflite-float32`` file run by LiteRT.
Concurrent requests share interpreter runs and repeats come from a cache (server/predict.py).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import Response

from registry.channels import CHANNEL_NAME
from server.fastpath import MAX_CLIENT_ID
from server.names import existing_model_name
from server.predict import NoServableArtifact, Predictor
from server.schemas import ErrorOut, PredictIn, PredictOut
from server.state import Services

router = APIRouter(prefix="/v1/models", tags=["models"])

PREDICT_PATH = "/{name}/predict"
ANSWER_HEADERS = {
    "X-Pollinate-Cache": {"description": "hit: answered from the cache; miss: computed.", "schema": {"type": "string"}},
    "X-Pollinate-Batch": {"description": "On a miss: how many requests shared the interpreter run.",
                          "schema": {"type": "integer"}},
    "X-Pollinate-Version": {"description": "The version that answered (as in the body).", "schema": {"type": "integer"}},
}


def predictor(request: Request) -> Predictor:
    """One per process, made on first use (on the event loop: no race). Not a FastAPI
    dependency: a plain ``def`` dependency (as ``ServicesDep``) runs in the thread pool, a
    thread hop that costs more than a cached answer."""
    found = getattr(request.app.state, "predictor", None)
    if found is None:
        svc: Services = request.app.state.services
        config = svc.config
        found = request.app.state.predictor = Predictor(
            svc.catalog, config.predict_cache_entries, config.predict_window_ms / 1000.0, config.predict_max_batch
        )
    return found


@router.post(
    PREDICT_PATH,
    response_model=PredictOut,
    responses={
        200: {"headers": ANSWER_HEADERS},
        404: {"model": ErrorOut, "description": "No such model, or no such channel of it."},
        409: {"model": ErrorOut, "description": "The resolved version has no tflite-float32 file to run."},
        422: {"model": ErrorOut, "description": "The inputs do not fit the version's input spec: the detail names"
              " the expected shape and dtype, or the row and column."},
    },
    summary="Predict on the server with the version this client would run",
    # the body is read by server/predict.py (a fast path for plain numbers), documented here
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": PredictIn.model_json_schema(ref_template="#/components/schemas/{model}")}}}},
)
async def predict(
    request: Request,
    name: Annotated[str, Path(description="Model name, e.g. digits.")],
    channel: Annotated[str, Query(pattern=f"^{CHANNEL_NAME.pattern}$", description="stable, canary, …")] = "stable",
    client_id: Annotated[
        str | None,
        Query(max_length=MAX_CLIENT_ID, description="A stable id for this client: decides its rollout cohort."),
    ] = None,
) -> Response:
    """The outputs of the version the channel's manifest gives this client (the rollout
    candidate when its cohort has it, the newest version while ``stable`` is unset; another
    channel that is not set is 404, as for the manifest), computed
    by LiteRT from the version's ``tflite-float32`` file: the numbers a device running that
    file gets. ``inputs`` are MODEL inputs, after the preprocessing the manifest describes;
    tabular models also take ``rows`` of named columns. Concurrent requests are run as one
    batch; a repeat of the same inputs for the same version is answered from a cache
    (``X-Pollinate-Cache: hit``). A version without a ``tflite-float32`` file (or one LiteRT
    cannot load) answers 409. Bodies are capped like every body here (64 KiB: 413 past it, about
    50 digits examples); ``pollinate predict`` is the way for files of inputs."""
    model = existing_model_name(name)
    try:
        answer = await predictor(request).predict(model, channel, client_id, await request.body())
    except NoServableArtifact as exc:
        raise HTTPException(409, str(exc)) from None
    return Response(answer.body, media_type="application/json", headers=answer.headers)
