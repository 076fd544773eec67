"""Models, their versions, and manifests: what a client should run.

The channel manifest is the hot route (every client revalidates it on start), so it is
resolved from the catalog's snapshot and answered with pre-rendered bytes; a matching
``If-None-Match`` costs a dict lookup and a string compare.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from registry.channels import CHANNEL_NAME
from server.fastpath import MAX_CLIENT_ID
from server.manifest import NO_CACHE, RenderedManifest, manifest_answer, version_prefix
from server.metrics import count_manifest
from server.names import existing_model_name
from server.schemas import (
    MAX_VERSION,
    ChannelStateOut,
    ErrorOut,
    ManifestOut,
    ModelListOut,
    ModelOut,
    VersionListOut,
    VersionOut,
)
from server.state import ServicesDep

router = APIRouter(prefix="/v1/models", tags=["models"])

CHANNEL_MANIFEST_PATH = "/v1/models/{name}/manifest"  # server/fastpath.py answers it when cached
NOT_FOUND = {404: {"model": ErrorOut, "description": "No such model or version."}}
REVALIDATED = {304: {"description": "Not modified: the ETag in If-None-Match is current."}}

ModelName = Annotated[str, Path(description="Model name, e.g. digits.")]
VersionNumber = Annotated[int, Path(ge=1, le=MAX_VERSION)]


class RawResponse(Response):
    """A response whose status, headers and body were all decided already."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes):
        self.status_code = status
        self.raw_headers = headers
        self.body = body
        self.background = None


def manifest_response(request: Request, rendered: RenderedManifest, cache_control: str) -> Response:
    """200 with the (maybe gzipped) manifest, or 304 when the client's copy is current."""
    status, headers, body = manifest_answer(
        rendered, request.headers.get("accept-encoding"), request.headers.get("if-none-match"), cache_control
    )
    return RawResponse(status, headers, body)


@router.get("", response_model=ModelListOut, summary="Every model, its newest version and its channels")
async def list_models(svc: ServicesDep) -> ModelListOut:
    models = await svc.catalog.models()
    return ModelListOut(models=[
        ModelOut(
            name=m.name,
            latest_version=m.latest_version,
            versions=m.versions,
            channels={c: ChannelStateOut(**s.to_dict()) for c, s in m.channels.items()},
        )
        for m in models.values()
    ])


@router.get(
    "/{name}/manifest",
    response_model=ManifestOut,
    responses={**REVALIDATED, 404: {"model": ErrorOut, "description": "No such model, or no such channel of it"
                                                                      " (only `stable` stands for the newest version"
                                                                      " while it is unset)."}},
    summary="The manifest of the version this client should run",
)
async def channel_manifest(
    request: Request,
    svc: ServicesDep,
    name: ModelName,
    channel: Annotated[str, Query(pattern=f"^{CHANNEL_NAME.pattern}$", description="stable, canary, …")] = "stable",
    client_id: Annotated[
        str | None,
        Query(max_length=MAX_CLIENT_ID, description="A stable id for this client: decides its rollout cohort."),
    ] = None,
) -> Response:
    """The channel's version, or the staged candidate when this client's cohort has it.
    ``stable`` (the default) stands for the newest version while it is unset; any other
    channel that is not set is 404 (a typo never gets the newest, unreviewed version).
    ``cohort`` in the body says which. Revalidate with ``If-None-Match``: the ETag changes
    whenever the answer would."""
    resolved = await svc.catalog.channel_manifest(existing_model_name(name), channel, client_id)
    response = manifest_response(request, resolved.manifest, NO_CACHE)
    count_manifest(name, resolved.manifest.version, resolved.channel_label, response.status_code)
    return response


@router.get(
    "/{name}/versions",
    response_model=VersionListOut,
    responses=NOT_FOUND,
    summary="Every version of a model, oldest first",
)
async def list_versions(svc: ServicesDep, name: ModelName) -> VersionListOut:
    info = await svc.catalog.model(existing_model_name(name))
    records = await svc.catalog.records(info.name)
    return VersionListOut(model=info.name, versions=[
        VersionOut(
            version=r.version,
            created_at=r.created_at,
            source=r.lineage.source,
            formats=sorted(r.artifacts),
            manifest_url=f"{version_prefix(r.model, r.version)}/manifest",
        )
        for r in records
    ])


@router.get(
    "/{name}/versions/{version}/manifest",
    response_model=ManifestOut,
    responses={**REVALIDATED, **NOT_FOUND},
    summary="The manifest of one fixed version",
)
async def version_manifest(request: Request, svc: ServicesDep, name: ModelName, version: VersionNumber) -> Response:
    """A version's files never change, but the exporter may attach new formats to it
    later, so this manifest is revalidated (``no-cache`` + strong ETag) rather than
    cached as immutable; the files it lists are immutable."""
    rendered = await svc.catalog.version_manifest(existing_model_name(name), version)
    response = manifest_response(request, rendered, NO_CACHE)
    count_manifest(name, version, "(fixed)", response.status_code)
    return response
