"""A version's files: immutable bytes, cached forever, resumable (see ``server/blobs.py``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from server.blobs import BlobResponse
from server.names import existing_file_name, existing_format_name, existing_model_name
from server.schemas import MAX_VERSION, ErrorOut
from server.state import ServicesDep

router = APIRouter(prefix="/v1/models", tags=["files"])

FILE_PATH = "/{name}/versions/{version}/files/{format}/{file}"  # server/fastpath.py answers known files
BYTES = {"schema": {"type": "string", "format": "binary"}}
RESPONSES = {
    200: {
        "description": "The file. Immutable: cache it forever; the ETag is its sha256.",
        "content": {"application/octet-stream": BYTES, "application/json": {}, "image/png": BYTES,
                    "text/markdown": {"schema": {"type": "string"}}},
    },
    206: {"description": "The requested byte range (Range: bytes=…)."},
    304: {"description": "Not modified: If-None-Match holds this file's ETag."},
    404: {"model": ErrorOut, "description": "No such model, version, format or file."},
    416: {"model": ErrorOut, "description": "The range starts past the end of the file."},
}


async def get_file(
    svc: ServicesDep,
    name: str,
    version: Annotated[int, Path(ge=1, le=MAX_VERSION)],
    format: Annotated[str, Path(description="e.g. tfjs-layers, tflite-int8, keras, report.")],
    file: Annotated[str, Path(description="e.g. model.json, group1-shard1of1.bin, model.tflite.")],
) -> BlobResponse:
    artifact = await svc.catalog.artifact(
        existing_model_name(name), version, existing_format_name(format), existing_file_name(file)
    )
    return BlobResponse(svc.catalog.blob(artifact), svc.blobs)


for method in ("GET", "HEAD"):
    router.add_api_route(
        FILE_PATH,
        get_file,
        methods=[method],
        operation_id=f"{method.lower()}_file",
        response_class=BlobResponse,
        status_code=200,
        responses=RESPONSES,
        summary="One file of one format of one version" + (" (headers only)" if method == "HEAD" else ""),
    )
