"""Bearer-token authentication for the daemon's mutating endpoints.

Anyone who can POST to a daemon can rewrite the model it serves, so every POST needs the shared
token; GET endpoints (health, metrics, world size, version) stay open for probes and Prometheus.
The check itself runs in `guard.RequestGuard`, before the body is read; the dependency here
declares the scheme in the OpenAPI document and guards extra routers' GET routes too.
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

SCHEME = HTTPBearer(auto_error=False, scheme_name="bearerAuth",
                    description="The shared token (--token-file or $WEIGHTSYNC_AUTH_TOKEN).")


class BearerAuth:
    """The token check; as a FastAPI dependency: 401 unless `Authorization: Bearer <token>`."""

    def __init__(self, token: str | None):
        # Tokens are visible ASCII (weightsync.tokens.clean_token): their bytes are their characters.
        self._token = token.encode("ascii") if token else None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def allows(self, authorization: str) -> bool:
        """Whether an Authorization header value carries the token (always, without a token)."""
        if self._token is None:
            return True
        scheme, _, presented = authorization.partition(" ")
        # Servers read header bytes as Latin-1, so encoding back gives the bytes the client sent.
        # compare_digest takes the same time wherever the strings differ: no timing oracle.
        sent = presented.strip().encode("latin-1", errors="replace")
        return scheme.lower() == "bearer" and hmac.compare_digest(sent, self._token)

    async def __call__(self, credentials: HTTPAuthorizationCredentials | None = Security(SCHEME)) -> None:
        if self._token is None:
            return
        presented = f"{credentials.scheme} {credentials.credentials}" if credentials is not None else ""
        if not self.allows(presented):
            raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
