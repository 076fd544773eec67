"""Where the web client is, and whether the demo page can work there.

The page (``web_client/index.html``) loads TF.js from ``vendor/tfjs/`` beside it. In a checkout
``npm ci`` in ``web_client/`` copies those files out of node_modules (``web_client/vendor.mjs``);
an installed Pollinate ships the folder as package data of the ``web_client`` package. Either
way the files the page needs are listed in ``web_client/vendor.json``, and any local target of
the page's import map must exist too.

A page without them would load and then fail in the browser with nothing on screen, so the
server refuses to start instead (``check_web_client``, called by ``server.serving.prepare``),
and ``/`` explains what is missing if the files disappear later. A folder given with
``POLLINATE_WEB_CLIENT`` that holds no ``index.html`` means "no demo page" (the API alone);
``POLLINATE_WEB_CLIENT=off`` says so explicitly.

Only what ships is served (``servable``). In a checkout the web client's folder also holds
``node_modules`` (all of npm's packages, with their ``package.json`` files), the tests, the
tools, ``package.json`` and the package's ``__init__.py``; none of it is the page's, and an
anonymous visitor learnt our dependencies' exact versions from it. Pollinate's own web client
serves exactly ``SHIPPED``: the patterns of ``pyproject.toml``'s package data for
``web_client`` (tests/test_package.py checks the two are the same list), so a checkout serves
what an installed Pollinate has. A folder of the operator's own (``POLLINATE_WEB_CLIENT``)
serves its files except the ones no page needs: anything under ``node_modules``, ``test``,
``tools`` or a dot-folder, ``package.json``, ``package-lock.json`` and Python files.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import PollinateError

if TYPE_CHECKING:
    from server.config import ServerConfig

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "web_client"
VENDOR_SPEC = "vendor.json"
OFF = "off"  # POLLINATE_WEB_CLIENT=off: serve the API without the demo page
_IMPORT_MAP = re.compile(r'<script type="importmap">(.*?)</script>', re.S)
# What ships of web_client/: pyproject.toml's [tool.setuptools.package-data] web_client list
# (setuptools' glob: `*` stays inside one folder). tests/test_package.py keeps them equal.
SHIPPED = ("*.html", "*.js", "vendor.json", "app/*", "lib/*", "dashboard/*", "try/*", "vendor/tfjs/*")
# Never served from an operator's folder either: what development leaves beside a page.
NEVER_FOLDERS = frozenset({"node_modules", "test", "tests", "tools", "__pycache__"})
NEVER_FILES = frozenset({"package.json", "package-lock.json"})


def ships(relative: str) -> bool:
    """Whether a path inside the web client ("app/app.js") is one of the files that ship."""
    parts = relative.split("/")
    return any(len(parts) == len(pattern) and all(map(fnmatchcase, parts, pattern)) for pattern in _SHIPPED_PARTS)


_SHIPPED_PARTS = [tuple(p.split("/")) for p in SHIPPED]


def servable(relative: str, own: bool) -> bool:
    """Whether a web client may serve the file at ``relative`` (a "/"-separated path inside its
    folder): Pollinate's own (``own``: ``is_default``) what ships, another folder all but what no
    page needs."""
    if not relative or relative.startswith("/") or ".." in relative.split("/"):
        return False
    if own:
        return ships(relative)
    parts = relative.split("/")
    return not (any(p in NEVER_FOLDERS or p.startswith(".") for p in parts[:-1]) or parts[-1] in NEVER_FILES
                or parts[-1].startswith(".") or parts[-1].endswith((".py", ".pyc")))


def default_web_client() -> Path:
    """The web client that comes with Pollinate: the ``web_client`` package where Python finds
    it (installed: site-packages; checkout: the repository's folder), else the checkout's folder."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "index.html").is_file():
            return Path(location)
    return REPO / PACKAGE


def _import_map_targets(index_html: str) -> list[str]:
    """Files the page's import map points at inside its own folder (``./x`` or ``x``, no URL)."""
    match = _IMPORT_MAP.search(index_html)
    if not match:
        return []
    try:
        imports = json.loads(match.group(1)).get("imports", {})
    except (json.JSONDecodeError, AttributeError):
        return []
    local = []
    for target in imports.values():
        if not isinstance(target, str) or re.match(r"^[a-z][a-z0-9+.-]*:|^/", target, re.I):
            continue  # http:, data:, /absolute: not this folder's business
        local.append(target.removeprefix("./"))
    return local


def vendored_files(folder: Path) -> list[str]:
    """The TF.js files ``vendor.json`` says the page needs (relative paths), plus their licences."""
    spec_file = Path(folder) / VENDOR_SPEC
    if not spec_file.is_file():
        return []
    spec = json.loads(spec_file.read_text())
    files = [f"{spec['folder']}/{name}" for name in spec.get("files", {})]
    if spec.get("licenses"):
        files.append(f"{spec['folder']}/{spec['licenses']}")
    return files


@dataclass(frozen=True)
class WebClientStatus:
    """What a web client folder holds: ``missing`` lists the files the page needs and lacks."""

    folder: Path | None
    missing: tuple[str, ...] = ()

    @property
    def has_page(self) -> bool:
        return self.folder is not None and (self.folder / "index.html").is_file()

    @property
    def whole(self) -> bool:
        return self.has_page and not self.missing

    def problem(self) -> str | None:
        """One sentence saying what is wrong and how to fix it; None when the page can work."""
        if self.folder is None or self.whole:
            return None
        shown = ", ".join(self.missing[:4]) + (f" and {len(self.missing) - 4} more" if len(self.missing) > 4 else "")
        return f"the web client at {self.folder} is incomplete (missing {shown}): {fix_hint(self.folder)}"


def fix_hint(folder: Path) -> str:
    """How to get the missing files back, for where this folder lives."""
    folder = Path(folder)
    if (folder.parent / "scripts" / "setup.sh").is_file() and (folder / "package-lock.json").is_file():
        return ("run scripts/setup.sh (it runs `npm ci` in web_client/, which copies TF.js into vendor/tfjs/; "
                "needs Node 20 with npm)")
    if folder.resolve() == default_web_client().resolve():
        return ("reinstall Pollinate from a wheel built with its web client (pip install --force-reinstall "
                "pollinate-*.whl, or pip install . from a checkout with Node 20 and npm), or set "
                "POLLINATE_WEB_CLIENT=off to serve the API without the demo page")
    return "complete that folder, point POLLINATE_WEB_CLIENT at a whole web client, or set POLLINATE_WEB_CLIENT=off"


def inspect_web_client(folder: Path | None) -> WebClientStatus:
    """Which of the files the page needs are missing (none when there is no folder at all)."""
    if folder is None:
        return WebClientStatus(None)
    folder = Path(folder)
    index = folder / "index.html"
    if not index.is_file():
        return WebClientStatus(folder, ("index.html",))
    try:
        required = _import_map_targets(index.read_text(encoding="utf-8")) + vendored_files(folder)
    except (OSError, ValueError, KeyError) as exc:
        return WebClientStatus(folder, (f"a readable {VENDOR_SPEC} ({exc})",))
    missing = [f for f in dict.fromkeys(required) if not (folder / f).is_file()]  # the page's own imports first
    return WebClientStatus(folder, tuple(missing))


def is_default(folder: Path | None) -> bool:
    return folder is not None and Path(folder).resolve() == default_web_client().resolve()


def check_web_client(config: ServerConfig) -> None:
    """Refuse to start a server whose demo page could not work (what ``pollinate serve`` and
    ``pollinate demo`` call before uvicorn starts). Pollinate's own web client must be whole; a
    folder given with POLLINATE_WEB_CLIENT must be whole if it has a page at all."""
    status = inspect_web_client(config.web_client)
    if status.folder is None or status.whole:
        return
    if not status.has_page and not is_default(status.folder):
        return  # an explicit folder without a page: the API alone, and / says where the docs are
    raise PollinateError(f"cannot serve the demo page: {status.problem()}")
