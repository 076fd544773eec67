"""`pollinate serve`: run the distribution service with uvicorn.

Workers are separate processes that import ``server.app:app_from_env``; the flags travel
to them as environment variables (``server/config.py``). With more than one worker,
Prometheus counters go through a fresh multiprocess folder so ``/metrics`` reports the
whole server, not whichever worker answered.
"""

from __future__ import annotations

import json
from dataclasses import replace
import os
import shutil
import socket
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.console import HomeOption, JsonOption, human_console
from core.errors import PollinateError


class Offload(str, Enum):
    nginx = "nginx"


def _free_port(host: str, port: int) -> int:
    """Check the address is free (one clear error instead of uvicorn's log); 0 picks one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise PollinateError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        return probe.getsockname()[1]


def serve(
    home: HomeOption = Path(".pollinate"),
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free port).")] = 8000,
    workers: Annotated[int, typer.Option("--workers", min=1, max=64, help="Worker processes.")] = 1,
    offload: Annotated[
        Optional[Offload],
        typer.Option("--offload", help="Let nginx send file bytes (X-Accel-Redirect); see --print-nginx-config."),
    ] = None,
    cors_origin: Annotated[
        Optional[list[str]],
        typer.Option("--cors-origin", help="Origin allowed to call the API from a browser (repeat; default"
                     " $POLLINATE_CORS_ORIGINS, comma-separated, else *)."),
    ] = None,
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request (slower).")] = False,
    print_nginx_config: Annotated[
        bool, typer.Option("--print-nginx-config", help="Print an nginx.conf fronting this server, and exit.")
    ] = False,
    nginx_port: Annotated[int, typer.Option("--nginx-port", min=1, max=65535, help="nginx's port in that config.")] = 8080,
    as_json: JsonOption = False,
) -> None:
    """Serve every model in the store over HTTP: manifests, files, channels, metrics."""
    from server.config import ServerConfig

    home = home.resolve()
    if print_nginx_config:
        from server.nginx import prepare_runtime, render_config

        prepare_runtime(home / "nginx")  # nginx needs its pid/log/temp folders to exist
        sys.stdout.write(render_config(home, port, nginx_port, runtime_dir=home / "nginx"))
        return
    config = replace(ServerConfig.from_env(), home=home, offload=offload.value if offload else None)
    if cors_origin:
        config = replace(config, cors_origins=tuple(cors_origin))
    from registry import Store

    Store(home)  # create or check the store now: a bad --home is one error line, not a worker crash
    port = _free_port(host, port)
    os.environ.update(config.to_env())
    metrics_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="pollinate-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else shown_host}:{port}"
    if as_json:
        sys.stdout.write(json.dumps({
            "url": url, "docs": f"{url}/docs", "home": str(home), "workers": workers,
            "offload": config.offload, "admin": bool(os.environ.get("POLLINATE_ADMIN_TOKEN")),
        }, sort_keys=True) + "\n")
        sys.stdout.flush()
    else:
        out = human_console(False)
        out.print(f"Serving [bold]{home}[/] at [bold]{url}[/]  (API docs: {url}/docs)", soft_wrap=True)
        if not os.environ.get("POLLINATE_ADMIN_TOKEN"):
            out.print("POLLINATE_ADMIN_TOKEN is unset: channel changes over HTTP are refused.", soft_wrap=True)
        if config.offload == "nginx":
            out.print(f"File bytes go through nginx: pollinate serve --home {home} --port {port}"
                      " --print-nginx-config > pollinate-nginx.conf", soft_wrap=True)

    import uvicorn

    try:
        uvicorn.run(
            "server.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            access_log=access_log,
            server_header=False,
            log_level="info" if access_log else "warning",
            timeout_graceful_shutdown=5,
        )
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
