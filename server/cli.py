"""`pollinate serve`: parse the flags, print where the service is, and call `server.run`."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.console import HomeOption, JsonOption, human_console


class Offload(str, Enum):
    nginx = "nginx"


# Trusted by default with --offload nginx: the nginx that --print-nginx-config renders proxies
# from this machine (docs/deployment.md says when to list other proxies instead).
LOCAL_PROXIES = ("127.0.0.1", "::1")


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
    trusted_proxy: Annotated[
        Optional[list[str]],
        typer.Option("--trusted-proxy", help="Address or network of a proxy whose X-Forwarded-For is believed (repeat;"
                     " default $POLLINATE_TRUSTED_PROXIES, comma-separated, else none; with --offload nginx, else"
                     " 127.0.0.1 and ::1)."),
    ] = None,
    openapi_admin: Annotated[
        bool, typer.Option("--openapi-admin", help="List the admin routes in /openapi.json too ($POLLINATE_OPENAPI_ADMIN=1).")
    ] = False,
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
    if trusted_proxy:  # a bad address is one error line (InvalidInput), exit 2
        config = replace(config, trusted_proxies=tuple(trusted_proxy))
    elif config.offload == "nginx" and not config.trusted_proxies:
        config = replace(config, trusted_proxies=LOCAL_PROXIES)  # the nginx that --print-nginx-config renders
    if openapi_admin:
        config = replace(config, openapi_admin=True)

    def announce(listening) -> None:
        url = listening.url
        if as_json:
            sys.stdout.write(json.dumps({
                "url": url, "docs": f"{url}/docs", "home": str(home), "workers": workers,
                "offload": config.offload, "admin": bool(config.admin_token),
            }, sort_keys=True) + "\n")
            sys.stdout.flush()
            return
        out = human_console(False)
        out.print(f"Serving [bold]{home}[/] at [bold]{url}[/]  (API docs: {url}/docs)", soft_wrap=True)
        if not config.admin_token:
            out.print("POLLINATE_ADMIN_TOKEN is unset: channel changes over HTTP are refused.", soft_wrap=True)
        if config.offload == "nginx":
            out.print(f"File bytes go through nginx: pollinate serve --home {home} --port {listening.port}"
                      " --print-nginx-config > pollinate-nginx.conf", soft_wrap=True)

    from server.serving import run

    run(config, host=host, port=port, workers=workers, access_log=access_log, announce=announce)
