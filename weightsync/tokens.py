"""Where every weightsync process finds the shared bearer token.

The daemon checks it, the operator and the trainer present it; all of them read it the same way
(a mounted Secret's file, else $WEIGHTSYNC_AUTH_TOKEN). Torch-free and HTTP-free, so that the
operator, which runs without PyTorch, reads it from the same place as the daemons.
"""

from __future__ import annotations

import os
from pathlib import Path

TOKEN_ENV = "WEIGHTSYNC_AUTH_TOKEN"


def load_token(token_file: Path | None = None) -> str | None:
    """The token from `token_file` (e.g. a mounted Secret) or $WEIGHTSYNC_AUTH_TOKEN, or None."""
    if token_file is not None:
        token = token_file.read_text().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None
