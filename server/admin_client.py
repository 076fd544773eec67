"""The admin API's client: move a channel on a running `pollinate serve` over HTTP.

The routes live in this room (``server/routers/channels.py``), so their client does too;
`pollinate models promote|rollback --server URL` reaches it through the composer, and the
registry never learns a URL. Stdlib only (urllib), so the CLI stays light:

    PUT  /v1/models/{name}/channels/{channel}           promote / staged rollout
    POST /v1/models/{name}/channels/{channel}/rollback  undo the last move

Any refusal becomes one PollinateError line carrying the server's JSON ``detail``.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from urllib.parse import quote

from core.errors import PollinateError
from registry.channels import ChannelState
from server.config import ENV_ADMIN_TOKEN

TIMEOUT_S = 30


class AdminClient:
    """Bearer-token admin requests to one server (the token from $POLLINATE_ADMIN_TOKEN by default)."""

    def __init__(self, server: str, token: str | None = None):
        if not server.startswith(("http://", "https://")):
            raise PollinateError(f"--server must be an http:// or https:// URL, got {server!r}")
        token = token if token is not None else os.environ.get(ENV_ADMIN_TOKEN)
        if not token:
            raise PollinateError(f"--server needs the admin token in {ENV_ADMIN_TOKEN}")
        self.server = server.rstrip("/")
        self._token = token

    def promote(self, name: str, channel: str, version: int, *, rollout_percent: float | None = None) -> ChannelState:
        return self._channel_request("PUT", name, channel, {"version": version, "rollout_percent": rollout_percent})

    def rollback(self, name: str, channel: str) -> ChannelState:
        return self._channel_request("POST", name, channel, None, suffix="/rollback")

    def _channel_request(self, method: str, name: str, channel: str, body: dict | None, suffix: str = "") -> ChannelState:
        path = f"/v1/models/{quote(name, safe='')}/channels/{quote(channel, safe='')}{suffix}"
        payload = self._request(method, path, body)
        return ChannelState(**{k: payload.get(k) for k in ("model", "channel", "version", "candidate_version",
                                                           "rollout_percent", "updated_at")})

    def _request(self, method: str, path: str, body: dict | None) -> dict:
        request = urllib.request.Request(
            self.server + path,
            data=b"" if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json",
                     "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise PollinateError(f"{self.server} refused ({exc.code}): {_detail(exc)}") from None
        except urllib.error.URLError as exc:
            raise PollinateError(f"cannot reach {self.server}: {exc.reason}") from None
        except (OSError, ValueError) as exc:  # timeouts, a malformed URL, a body that is not JSON
            raise PollinateError(f"cannot talk to {self.server}: {exc}") from None


def _detail(error) -> str:
    """The server's JSON `detail` on one line (FastAPI's 422 gives a list of problems)."""
    try:
        detail = json.loads(error.read()).get("detail", error.reason)
    except (ValueError, AttributeError, OSError):
        return str(error.reason)
    if isinstance(detail, list):
        detail = "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', [])[1:])}: {item.get('msg')}" if isinstance(item, dict) else str(item)
            for item in detail
        )
    return " ".join(str(detail).split())
