"""Bounds on the shape of a JSON body, checked on its bytes before anything parses it.

Python's ``json`` module recurses once per nesting level: a 30 KB body of ``[[[[…`` made the
telemetry route raise RecursionError (a 500) before any validation ran, and every route that
parses JSON had the same hole. So the app's body-limit middleware (``server/limits.py``), which
already holds every body but a device update's, checks each one here, once, before any route
sees it:

- nesting depth at most ``MAX_DEPTH`` (arrays and objects);
- at most ``MAX_ITEMS`` elements in one array or members in one object;
- at most ``MAX_STRING`` bytes in one string (a key or a value, as written, escapes included).

Legitimate bodies are far inside these: a digits predict batch nests 5 deep, a telemetry
batch 4, the longest strings are client ids (64 or 256 characters) and labels. With the
64 KiB body cap an array could hold ~32,000 numbers; ``MAX_ITEMS`` is a third of that.

A body of at most ``MAX_STRING`` bytes with at most ``MAX_DEPTH`` brackets in all (a feedback
item, a telemetry batch without ``recent`` ids) cannot break any bound: two counts and it is
through. Otherwise the check never parses: ``bytes.split``, ``translate`` and ``replace`` do the work in C
(measured: ~25 µs for a 5 KB telemetry batch, a third of what ``json.loads`` takes for it;
under 2 µs for a feedback item). Strings are cut out first (they may hold brackets), every
byte that is not a bracket is dropped, and innermost ``[]`` pairs are removed one level per
pass: the passes needed are the depth. Only a body with ``MAX_ITEMS`` commas in all can hold a
container that wide, and only such a body is looked at for it. A body that is not JSON at
all is left to its route's parser (whose error is cheap) unless it would still make that
parser recurse past the bound: more than ``MAX_DEPTH`` brackets that never close.
"""

from __future__ import annotations

import codecs
import json
import re

MAX_DEPTH = 32
MAX_ITEMS = 10_000
MAX_STRING = 8192

# A JSON string as json's scanner reads it (an escape is a backslash and the next byte).
_STRING = re.compile(rb'"([^"\\]*(?:\\.[^"\\]*)*)"', re.S)
# Keep brackets and commas only, braces as brackets: the depth a parser reaches before it
# fails on a mismatched closer is the same either way.
_AS_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b"[]{},")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_TOO_DEEP = b"[" * (MAX_DEPTH + 1)
_INNERMOST_WITH_ITEMS = re.compile(rb"\[,*\]")
_TOO_MANY = b"," * MAX_ITEMS
_UTF8_BOM = codecs.BOM_UTF8
TOO_DEEP = f"the JSON body nests more than {MAX_DEPTH} levels deep (or is not JSON): at most {MAX_DEPTH} are accepted"
TOO_MANY = f"a JSON array or object has more than {MAX_ITEMS} items: at most {MAX_ITEMS} are accepted"


def problem(body: bytes) -> str | None:
    """Why ``body`` breaks the bounds (one sentence naming the limit), or None."""
    if not body:
        return None
    if len(body) <= MAX_STRING and body.count(b"[") + body.count(b"{") <= MAX_DEPTH:
        return None  # too few brackets to nest past the bound, too short for a long string or many items
    if b"\x00" in body[:4] and not body.startswith(_UTF8_BOM):  # UTF-16 or UTF-32, as json.loads detects it
        try:
            body = body.decode(json.detect_encoding(body)).encode("utf-8")
        except (UnicodeDecodeError, LookupError):
            return None  # not JSON the parser could read either: it refuses it cheaply
    # strings cut out: split at the quotes when nothing is escaped (most bodies), else by the regex
    parts = body.split(b'"') if b"\\" not in body else _STRING.split(body)
    if len(parts) > 1:
        if len(body) > MAX_STRING:  # a shorter body cannot hold a longer string
            longest = max(map(len, parts[1::2]))
            if longest > MAX_STRING:
                return f"a JSON string is {longest} bytes long: at most {MAX_STRING} are accepted"
        body = b"".join(parts[0::2])
    if body.count(b",") >= MAX_ITEMS and _too_many_items(body.translate(_AS_BRACKETS, _NOT_STRUCTURE)):
        return TOO_MANY
    shape = body.translate(_AS_BRACKETS, _NOT_BRACKETS)
    if _TOO_DEEP in shape:
        return TOO_DEEP
    for _ in range(MAX_DEPTH):  # bytes.replace never rescans what it produced: one level a pass
        if not shape:
            return None
        reduced = shape.replace(b"[]", b"")
        if len(reduced) == len(shape):  # brackets that never close: not JSON, refused by its parser
            return None if shape.count(b"[") <= MAX_DEPTH else TOO_DEEP
        shape = reduced
    return None if not shape else TOO_DEEP


def _too_many_items(shape: bytes) -> bool:
    """Whether some container has more than MAX_ITEMS items: commas left beside each other
    once the containers inside it are gone are its separators (the rare, slow path: only
    bodies with that many commas in all get here)."""
    for _ in range(MAX_DEPTH + 1):
        if _TOO_MANY in shape:
            return True
        reduced = _INNERMOST_WITH_ITEMS.sub(b"", shape)
        if len(reduced) == len(shape):
            return False
        shape = reduced
    return False
