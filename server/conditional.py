"""The parts of HTTP caching and partial downloads we answer ourselves (RFC 9110 §13, §14).

Starlette's ``FileResponse`` ignores ``If-None-Match`` and manifests are not files, so
revalidation and ranges are decided here, once, for every route that needs them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ETAG = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')
GZIP_SUFFIX = '-gzip"'
# One range only; a list ("0-1,5-9") does not match and gets the whole file.
_RANGE = re.compile(r"\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*", re.ASCII | re.IGNORECASE)


def _opaque(tag: str) -> str:
    """An entity tag without its weakness and without our gzip-variant suffix.

    ``If-None-Match`` uses the weak comparison, and the gzip variant of a resource has the
    same content, so a client holding either representation is up to date.
    """
    if tag.endswith(GZIP_SUFFIX):
        return tag[: -len(GZIP_SUFFIX)] + '"'
    return tag


def none_match(header: str | None, etag: str) -> bool:
    """True when ``If-None-Match`` lists this ETag (or ``*``): answer 304."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    wanted = _opaque(etag)
    pos = 0
    while pos < len(header):
        match = _ETAG.match(header, pos)
        if match is None or match.end() == pos:
            return False  # malformed list: ignore the condition rather than guess
        if _opaque(match.group(2)) == wanted:
            return True
        pos = match.end()
    return False


def accepts_gzip(header: str | None) -> bool:
    """``Accept-Encoding`` allows gzip (listed, or ``*``, with a q-value above 0)."""
    if not header:
        return False
    star = False
    for part in header.split(","):
        coding, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        coding = coding.lower()
        if coding == "gzip":
            return q > 0
        if coding == "*":
            star = q > 0
    return star


def if_range_allows(header: str | None, etag: str) -> bool:
    """``If-Range`` (strong comparison, entity tags only): serve the range only if unchanged."""
    if header is None:
        return True
    header = header.strip()
    return not header.startswith("W/") and header == etag


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


class Unsatisfiable(Exception):
    """A well-formed range that lies outside the file: answer 416."""


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """One byte range, or None to send the whole file.

    A malformed header, another unit or several ranges are ignored (RFC 9110 allows a
    server to answer 200 with the whole file); a single range wholly past the end raises
    :class:`Unsatisfiable`.
    """
    if not header:
        return None
    match = _RANGE.fullmatch(header)
    if match is None:
        return None
    first, last = match.groups()
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable()
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    if last != "" and int(last) < start:
        return None  # invalid (last before first): ignored, like any malformed Range
    if start >= size:
        raise Unsatisfiable()
    end = size - 1 if last == "" else min(int(last), size - 1)
    return ByteRange(start, end)
