"""The nginx config for ``--offload nginx``: rendered from ``pollinate.conf`` next to this file.

uvicorn pushes file bytes through Python in chunks; nginx sends them with ``sendfile``
(several times faster for multi-MiB weight shards). In offload mode the app still
decides everything about a file request and only hands the byte-sending to nginx.
"""

from __future__ import annotations

import os
from pathlib import Path

from server.config import OFFLOAD_PREFIX, ServerConfig

# Uploads one address may have in flight through nginx (the server-wide cap is POLLINATE_MAX_UPLOADS).
UPLOADS_PER_ADDRESS = 16

TEMPLATE = Path(__file__).with_name("pollinate.conf")
MIME_TYPES = "/etc/nginx/mime.types"


def render_config(
    home: str | os.PathLike,
    upstream_port: int,
    listen_port: int,
    *,
    runtime_dir: str | os.PathLike | None = None,
    listen_host: str = "127.0.0.1",
    upstream_host: str = "127.0.0.1",
    daemon: bool = True,
    single_process: bool = False,
    worker_processes: int | str = "auto",
    user: str | None = None,
    config: ServerConfig | None = None,
) -> str:
    """A complete nginx.conf that fronts the app at ``upstream_port``.

    ``runtime_dir`` holds the pid file, error log and temp folders (default: ``<home>/nginx``).
    ``daemon=False`` keeps nginx in the foreground (a supervisor, a container, a test);
    ``single_process`` runs one process with no master (tests). ``user`` sets the worker
    user when nginx starts as root (the workers must be able to read ``objects/``).
    ``config`` (default: from the environment) gives the timeouts, body and upload limits and
    the enrolment rate, so that nginx and the app refuse the same things.
    """
    config = config or ServerConfig.from_env()
    home = Path(home).resolve()
    runtime = Path(runtime_dir).resolve() if runtime_dir else home / "nginx"
    process = ("" if daemon else "daemon off;\n") + ("master_process off;\n" if single_process else "")
    if user:
        process += f"user {user};\n"
    mime = f"include {MIME_TYPES};" if Path(MIME_TYPES).is_file() else ""
    values = {
        "@@PROCESS@@": process.strip(),
        "@@WORKERS@@": "1" if single_process else str(worker_processes),
        "@@RUNTIME@@": str(runtime),
        "@@ERROR_LOG@@": str(runtime / "error.log"),
        "include @@MIME_TYPES@@;": mime,
        "@@UPSTREAM@@": f"{upstream_host}:{int(upstream_port)}",
        "@@LISTEN@@": f"{listen_host}:{int(listen_port)}",
        "@@PREFIX@@": OFFLOAD_PREFIX,
        "@@OBJECTS@@": str(home / "objects"),
        "@@HEADER_TIMEOUT@@": str(max(1, round(config.header_timeout_s))),
        "@@BODY_TIMEOUT@@": str(max(1, round(config.body_timeout_s))),
        "@@MAX_UPDATE_BYTES@@": str(config.max_update_bytes),
        "@@MAX_UPLOADS@@": str(config.max_uploads),
        "@@UPLOADS_PER_ADDRESS@@": str(min(UPLOADS_PER_ADDRESS, config.max_uploads)),
        "@@ENROL_RATE@@": str(max(1, round(config.enrol_rate))),
        "@@ENROL_BURST@@": str(max(1, round(config.enrol_rate))),
    }
    text = TEMPLATE.read_text()
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


def prepare_runtime(runtime_dir: str | os.PathLike) -> Path:
    """Create the folders the rendered config points at (nginx does not create them)."""
    runtime = Path(runtime_dir)
    for sub in ("", "client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (runtime / sub).mkdir(parents=True, exist_ok=True)
    return runtime
