"""Who may move channels: the holder of ``POLLINATE_ADMIN_TOKEN``, and nobody else.

A dependency, so every admin route declares it and OpenAPI shows the bearer scheme. A
server started without a token refuses every change (403, and says why) rather than
leaving the door open. The token is compared in constant time.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

bearer = HTTPBearer(auto_error=False, description="The server's POLLINATE_ADMIN_TOKEN.")

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="pollinate"'}


def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    token: str | None = request.app.state.services.config.admin_token
    if not token:
        raise HTTPException(
            403, "this server has no admin token (POLLINATE_ADMIN_TOKEN is unset): channel changes are refused"
        )
    if credentials is None:
        raise HTTPException(401, "missing bearer token: send Authorization: Bearer <POLLINATE_ADMIN_TOKEN>",
                            headers=CHALLENGE)
    if not hmac.compare_digest(credentials.credentials.encode("utf-8"), token.encode("utf-8")):
        raise HTTPException(401, "wrong bearer token", headers=CHALLENGE)


AdminOnly = Depends(require_admin)
