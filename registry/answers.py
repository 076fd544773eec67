"""Answering the senders of a group commit (registry/edge.py's and registry/monitoring.py's
committer threads): each queued request carries a future — a concurrent one for a thread, an
asyncio one with its loop for a coroutine — and learns its result or its error once the group
it was in is committed or rolled back."""

from __future__ import annotations

import asyncio
import contextlib

from core.errors import PollinateError


def answer(group: list, failed: dict, results: dict, *, what: str) -> None:
    """Tell each sender of a finished group its result (`results[p]`) or error (`failed[p]`;
    neither: "the {what} commit failed"): a thread through its future, an event loop once for
    all of its own (one wake-up, not one per request). Each pending has `.future` and `.loop`."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for pending in group:
        error = failed.get(pending)
        if error is None and pending not in results:
            error = PollinateError(f"the {what} commit failed")
        if pending.loop is not None:
            by_loop.setdefault(pending.loop, []).append((pending.future, results.get(pending), error))
        elif not pending.future.done():
            if error is not None:
                pending.future.set_exception(error)
            else:
                pending.future.set_result(results[pending])
    for loop, answers in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(_settle, answers)


def _settle(answers: list) -> None:
    for future, result, error in answers:
        if future.done():  # the request was called off meanwhile
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
