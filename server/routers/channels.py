"""Channels: read by anyone, moved only with the admin token.

A move goes straight to the store (one SQLite transaction, recorded in the history), so
every worker and every other process sees it on its next request, and it survives any
restart. Store refusals that depend on the channel's state (a staged rollout on an unset
channel, a rollback with nothing to undo) are conflicts (409), not bad input.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path
from starlette.concurrency import run_in_threadpool

from core.errors import InvalidInput
from registry.channels import CHANNEL_NAME
from server.auth import AdminOnly
from server.names import existing_model_name
from server.schemas import ChannelMoveIn, ChannelsOut, ChannelStateOut, ErrorOut, HistoryEntryOut
from server.state import ServicesDep

router = APIRouter(prefix="/v1/models", tags=["channels"])

ChannelName = Annotated[str, Path(pattern=f"^{CHANNEL_NAME.pattern}$", description="stable, canary, or [a-z0-9_-]{1,32}.")]
REFUSALS = {
    401: {"model": ErrorOut, "description": "Missing or wrong bearer token."},
    403: {"model": ErrorOut, "description": "The server has no admin token: changes are refused."},
    404: {"model": ErrorOut, "description": "No such model or version."},
    409: {"model": ErrorOut, "description": "The channel's state does not allow this move."},
    413: {"model": ErrorOut, "description": "Request body too large."},
}


@router.get(
    "/{name}/channels",
    response_model=ChannelsOut,
    responses={404: {"model": ErrorOut}},
    summary="A model's channels and every move they made",
)
async def list_channels(svc: ServicesDep, name: str) -> ChannelsOut:
    model = existing_model_name(name)

    def read() -> tuple[dict, list]:
        return svc.store.list_channels(model), svc.store.channel_history(model)

    states, history = await run_in_threadpool(read)
    return ChannelsOut(
        model=model,
        channels={c: ChannelStateOut(**s.to_dict()) for c, s in states.items()},
        history=[HistoryEntryOut(**row) for row in history],
    )


@router.put(
    "/{name}/channels/{channel}",
    response_model=ChannelStateOut,
    responses=REFUSALS,
    dependencies=[AdminOnly],
    summary="Promote a version, or stage it for a percent of clients",
)
async def move_channel(svc: ServicesDep, name: str, channel: ChannelName, move: ChannelMoveIn) -> ChannelStateOut:
    """``rollout_percent`` null or 100: everyone gets ``version``. Below 100: the channel
    keeps its version and ``version`` becomes the candidate for that share of clients,
    chosen by a stable hash of (model, channel, client id)."""
    model = existing_model_name(name)
    try:
        state = await run_in_threadpool(svc.store.set_channel, model, channel, move.version, move.rollout_percent)
    except InvalidInput as exc:
        raise HTTPException(409, str(exc)) from None
    return ChannelStateOut(**state.to_dict())


@router.post(
    "/{name}/channels/{channel}/rollback",
    response_model=ChannelStateOut,
    responses=REFUSALS,
    dependencies=[AdminOnly],
    summary="Undo the channel's last move",
)
async def rollback_channel(svc: ServicesDep, name: str, channel: ChannelName) -> ChannelStateOut:
    """Restores the state before the last move still in effect; ``version`` is null when
    that leaves the channel unset (clients then get the newest version)."""
    model = existing_model_name(name)
    try:
        state = await run_in_threadpool(svc.store.rollback, model, channel)
    except InvalidInput as exc:
        raise HTTPException(409, str(exc)) from None
    return ChannelStateOut(**state.to_dict())
