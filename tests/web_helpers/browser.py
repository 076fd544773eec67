"""Debian's headless chromium under Playwright (Playwright cannot download its own browser here).

One persistent context per call, on a fresh profile folder, so IndexedDB, the service worker
and the HTTP cache start empty. The page's console errors and uncaught exceptions are
collected so a test can assert there were none.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("POLLINATE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]


def missing_browser() -> list[str]:
    """What driving a real browser needs and this machine lacks (scripts/setup.sh --test installs it)."""
    missing = []
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        missing.append(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("Python playwright is not installed (pip install -e '.[test]')")
    return missing


def missing_requirements() -> list[str]:
    """What the checkout's browser tests need and this machine lacks: a browser, and the page's TF.js."""
    missing = missing_browser()
    if not (REPO / "web_client" / "vendor" / "tfjs" / "tf.fesm.min.js").is_file():
        missing.append("web_client/vendor/tfjs is missing (scripts/setup.sh, or cd web_client && npm ci)")
    return missing


@contextmanager
def chromium_context(profile: Path, **options) -> Iterator[tuple[object, list[str]]]:
    """(BrowserContext, messages): a headless chromium on a fresh profile; messages collects
    "pageerror: …" and "console.error: …" lines from every page."""
    from playwright.sync_api import sync_playwright

    messages: list[str] = []
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1280, "height": 900}, **options,
        )
        context.on("page", lambda page: (
            page.on("pageerror", lambda error: messages.append(f"pageerror: {error}")),
            page.on("console", lambda m: messages.append(f"console.{m.type}: {m.text}") if m.type == "error" else None),
        ))
        try:
            yield context, messages
        finally:
            context.close()
