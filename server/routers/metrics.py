"""``GET /metrics`` for Prometheus (text exposition format)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from server.metrics import exposition

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text."}},
    summary="Prometheus metrics (summed over all workers)",
)
async def metrics() -> Response:
    body, content_type = await run_in_threadpool(exposition)
    return Response(body, media_type=content_type, headers={"Cache-Control": "no-store"})
