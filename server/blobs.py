"""Answers for stored files: immutable bytes named by their sha256.

Because a file's URL (model, version, format, name) always maps to the same bytes, every
answer can be cached forever and revalidated by its hash: strong ``ETag`` = the sha256,
``Cache-Control: immutable``, ``If-None-Match`` → 304, one ``Range`` → 206 (resumable
downloads of big ``.tflite`` files), HEAD. JSON (TF.js's ``model.json``) is gzipped for
clients that accept it; the gzip copy is another representation and gets the ETag
``"<sha256>-gzip"`` (both revalidate each other).

Small files are kept in memory (they are immutable, so the cache never needs
invalidating); big ones are read in 1 MiB chunks off the event loop. With
``--offload nginx`` the body is left to nginx: the answer carries the same headers plus
``X-Accel-Redirect`` to the blob's path inside the store, and nginx sends it with
``sendfile`` (see ``server/nginx/``).
"""

from __future__ import annotations

import gzip
import mimetypes
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server.conditional import Unsatisfiable, accepts_gzip, if_range_allows, none_match, parse_range
from server.config import OFFLOAD_PREFIX
from server.metrics import OFFLOADED_BYTES

IMMUTABLE = "public, max-age=31536000, immutable"
CHUNK = 1 << 20
# Files up to this size are served from memory after the first read.
MEMORY_FILE_MAX = 1 << 20
MEMORY_TOTAL_MAX = 64 << 20
# JSON bigger than this is sent as is rather than compressed in memory.
GZIP_MAX = 16 << 20
GZIP_MIN = 1024

CONTENT_TYPES = {
    ".json": "application/json",
    ".tflite": "application/octet-stream",
    ".bin": "application/octet-stream",
    ".keras": "application/octet-stream",
    ".png": "image/png",
    ".md": "text/markdown; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
}
COMPRESSIBLE = ("application/json", "text/")
# The answer when the database lists a blob whose file is gone (a damaged store).
LOST = (503, [(b"content-type", b"application/json")],
        b'{"detail":"the store has lost the bytes of this file; run Store.verify()"}')


def content_type(name: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix in CONTENT_TYPES:
        return CONTENT_TYPES[suffix]
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


class MissingBytes(Exception):
    """The database lists a blob whose file is gone: the store is damaged, not the request."""


class ByteCache:
    """Least-recently-used bytes by key, bounded in total size (immutable content only)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes or key in self._items:
            return
        self._items[key] = value
        self.used += len(value)
        while self.used > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.used -= len(dropped)


@dataclass(frozen=True)
class Blob:
    """What a file answer needs to know about the stored bytes."""

    sha256: str
    size: int
    path: Path
    name: str


class BlobStore:
    """Reads blobs, with the memory caches shared by every file answer of one process."""

    def __init__(self, offload: str | None = None):
        self.offload = offload
        self.plain = ByteCache(MEMORY_TOTAL_MAX)
        self.gzipped = ByteCache(MEMORY_TOTAL_MAX)

    async def whole(self, blob: Blob) -> bytes:
        data = self.plain.get(blob.sha256)
        if data is None:
            try:
                data = await anyio.to_thread.run_sync(blob.path.read_bytes)
            except OSError:
                raise MissingBytes(blob.sha256) from None
            if blob.size <= MEMORY_FILE_MAX:
                self.plain.put(blob.sha256, data)
        return data

    async def gzip(self, blob: Blob) -> bytes:
        packed = self.gzipped.get(blob.sha256)
        if packed is None:
            data = await self.whole(blob)
            packed = await anyio.to_thread.run_sync(lambda: gzip.compress(data, compresslevel=6, mtime=0))
            self.gzipped.put(blob.sha256, packed)
        return packed


class BlobResponse(Response):
    """One stored file, answered according to the request's conditions.

    Everything is decided in ``__call__`` because the answer (200, 206, 304, 416, gzip or
    not, offloaded or not) depends on request headers, not only on the file.
    """

    def __init__(self, blob: Blob, blobs: BlobStore):
        self.blob = blob
        self.blobs = blobs
        self.status_code = 200
        self.background = None
        self.body = b""
        self.raw_headers = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_headers = {}
        for key, value in scope["headers"]:
            if key in (b"if-none-match", b"range", b"if-range", b"accept-encoding"):
                request_headers[key.decode()] = value.decode("latin-1")
        head = scope["method"] == "HEAD"
        blob = self.blob
        ctype = content_type(blob.name)
        compressible = ctype.startswith(COMPRESSIBLE)
        wants_range = "range" in request_headers
        use_gzip = (
            compressible
            and not wants_range
            and GZIP_MIN <= blob.size <= GZIP_MAX
            and self.blobs.offload is None
            and accepts_gzip(request_headers.get("accept-encoding"))
        )
        etag = f'"{blob.sha256}-gzip"' if use_gzip else f'"{blob.sha256}"'
        headers = [
            (b"etag", etag.encode()),
            (b"cache-control", IMMUTABLE.encode()),
        ]
        if compressible:
            headers.append((b"vary", b"Accept-Encoding"))

        if none_match(request_headers.get("if-none-match"), etag):
            await _answer(send, 304, headers, b"", head=True)
            return

        headers += [
            (b"content-type", ctype.encode()),
            (b"x-content-type-options", b"nosniff"),
        ]
        if self.blobs.offload == "nginx":
            # nginx sends the bytes (with Range and gzip) from the store's objects/ folder.
            location = f"{OFFLOAD_PREFIX}{blob.sha256[:2]}/{blob.sha256}"
            headers.append((b"x-accel-redirect", location.encode()))
            await _answer(send, 200, headers, b"", head=True)
            if not head:
                OFFLOADED_BYTES.inc(blob.size)
            return

        headers.append((b"accept-ranges", b"bytes"))
        if use_gzip:
            try:
                body = await self.blobs.gzip(blob)
            except MissingBytes:
                await _answer(send, *LOST, head=head)
                return
            headers.append((b"content-encoding", b"gzip"))
            await _answer(send, 200, headers, body, head=head)
            return

        byte_range = None
        if wants_range and if_range_allows(request_headers.get("if-range"), etag):
            try:
                byte_range = parse_range(request_headers["range"], blob.size)
            except Unsatisfiable:
                await _answer(send, 416, [
                    (b"content-range", f"bytes */{blob.size}".encode()),
                    (b"content-type", b"application/json"),
                    (b"cache-control", b"no-store"),
                ], b'{"detail":"range not satisfiable: the file has %d bytes"}' % blob.size, head=head)
                return
        status, start, length = 200, 0, blob.size
        if byte_range is not None:
            status, start, length = 206, byte_range.start, byte_range.length
            headers.append((b"content-range", byte_range.content_range(blob.size).encode()))

        try:
            if head:
                await _answer(send, status, headers, b"", head=True, length=length)
            elif blob.size <= MEMORY_FILE_MAX:
                data = await self.blobs.whole(blob)
                await _answer(send, status, headers, data[start : start + length])
            else:
                await _stream(send, status, headers, blob.path, start, length)
        except MissingBytes:
            await _answer(send, *LOST, head=head)


async def _answer(
    send: Send, status: int, headers: list, body: bytes, head: bool = False, length: int | None = None
) -> None:
    if status != 304:
        headers = headers + [(b"content-length", str(len(body) if length is None else length).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _stream(send: Send, status: int, headers: list, path: Path, start: int, length: int) -> None:
    """Send ``length`` bytes from ``start`` in 1 MiB reads done off the event loop."""
    try:
        fd = await anyio.to_thread.run_sync(os.open, path, os.O_RDONLY)
    except OSError:
        raise MissingBytes(str(path)) from None
    try:
        await send({
            "type": "http.response.start",
            "status": status,
            "headers": headers + [(b"content-length", str(length).encode())],
        })
        offset, end = start, start + length
        while offset < end:
            chunk = await anyio.to_thread.run_sync(os.pread, fd, min(CHUNK, end - offset), offset)
            if not chunk:  # the file is shorter than recorded: end the body early
                break
            offset += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": offset < end})
        if offset < end:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        os.close(fd)
