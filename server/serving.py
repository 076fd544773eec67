"""Running the service: `server.run(config, ...)` is what `pollinate serve` and `pollinate demo`
call (the Typer command only parses flags and prints).

Workers are separate processes that import ``server.app:app_from_env``; the config travels
to them as environment variables (``server/config.py``). With more than one worker,
Prometheus counters go through a fresh multiprocess folder so ``/metrics`` reports the
whole server, not whichever worker answered.

uvicorn runs with its own proxy-header handling off: on by default, it believes any
``X-Forwarded-For`` from 127.0.0.1, so on one machine every local caller could name its
own address. Who is asking is decided by the app alone (``server/addresses.py``: only the
proxies in ``POLLINATE_TRUSTED_PROXIES`` are believed). Its HTTP protocol is
``server/protocol.py``'s, which adds the header and body read timeouts (in every worker:
uvicorn imports it by name).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from core.errors import PollinateError
from server.config import ENV_ADMIN_TOKEN, ServerConfig
from server.web_assets import check_web_client

# uvicorn's httptools protocol with read timeouts, imported by name in every worker
HTTP_PROTOCOL = "server.protocol:TimedHttpToolsProtocol"


def uvicorn_options() -> dict:
    """What every uvicorn this package starts is given, whatever else it is told: its own
    proxy headers off (the app decides whom to believe) and the protocol with timeouts."""
    return {"http": HTTP_PROTOCOL, "proxy_headers": False, "server_header": False}


@dataclass(frozen=True)
class Listening:
    """Where the server answers, once its port is known (port 0 picks a free one)."""

    host: str
    port: int
    workers: int

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '') else shown}:{self.port}"


def free_port(host: str, port: int) -> int:
    """Check the address is free (one clear error instead of uvicorn's log); 0 picks one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise PollinateError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        return probe.getsockname()[1]


def prepare(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> Listening:
    """Everything that can fail before uvicorn starts, as one clear error: the store opens (or
    migrates), the web client and its TF.js files are there, the port is free."""
    from registry import Store

    if workers < 1:
        raise PollinateError("workers must be at least 1")
    Store(config.home)  # create, migrate or refuse the store now: one error line, not a worker crash
    check_web_client(config)  # Pollinate's own page must be whole (with its vendored TF.js)
    return Listening(host, free_port(host, port), workers)


def run(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
        access_log: bool = False, announce: Callable[[Listening], None] | None = None) -> None:
    """Serve the store in `config` until interrupted. `announce` hears the real address first."""
    listening = prepare(config, host, port, workers)
    os.environ.update(config.to_env())
    if config.admin_token and not os.environ.get(ENV_ADMIN_TOKEN):
        os.environ[ENV_ADMIN_TOKEN] = config.admin_token  # workers rebuild the config from the environment
    metrics_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="pollinate-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    if announce:
        announce(listening)

    import uvicorn

    try:
        uvicorn.run(
            "server.app:app_from_env",
            factory=True,
            host=listening.host,
            port=listening.port,
            workers=workers,
            access_log=access_log,
            log_level="info" if access_log else "warning",
            timeout_graceful_shutdown=5,
            **uvicorn_options(),
        )
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
