"""Liveness for load balancers and the test harness: no store access, always cheap."""

from __future__ import annotations

from fastapi import APIRouter

from server.schemas import HealthOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut)
async def healthz() -> HealthOut:
    return HealthOut()
