"""Path segments checked before anything reaches the store.

A model, format or file name that breaks the store's naming rules cannot exist, so a GET
for it is a plain 404; this is also where traversal attempts end (``..``, a decoded
``%2F``, control characters): names are looked up as database rows, never joined into a
filesystem path.
"""

from __future__ import annotations

from core.errors import InvalidInput, NotFound
from registry.store import check_file_name, check_format_name, check_model_name


def existing_model_name(name: str) -> str:
    try:
        return check_model_name(name)
    except InvalidInput:
        raise NotFound(f"no model named {name!r}") from None


def existing_format_name(fmt: str) -> str:
    try:
        return check_format_name(fmt)
    except InvalidInput:
        raise NotFound(f"no format named {fmt!r}") from None


def existing_file_name(name: str) -> str:
    try:
        return check_file_name(name)
    except InvalidInput:
        raise NotFound(f"no file named {name!r}") from None
