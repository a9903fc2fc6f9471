"""Bearer-token authentication for the daemon's mutating endpoints.

Anyone who can POST to a daemon can rewrite the model it serves, so every POST needs the shared
token; GET endpoints (health, metrics, world size, version) stay open for probes and Prometheus.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from fastapi import HTTPException, Request

TOKEN_ENV = "WEIGHTSYNC_AUTH_TOKEN"


def load_token(token_file: Path | None = None) -> str | None:
    """The token from `token_file` (e.g. a mounted Secret) or $WEIGHTSYNC_AUTH_TOKEN, or None."""
    if token_file is not None:
        token = token_file.read_text().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


class BearerAuth:
    """A FastAPI dependency: 401 unless the request carries `Authorization: Bearer <token>`."""

    def __init__(self, token: str | None):
        self._token = token.encode() if token else None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    async def __call__(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes the same time wherever the strings differ: no timing oracle.
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), self._token):
            raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
