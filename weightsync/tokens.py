"""Where every weightsync process finds the shared bearer token, and what a usable one is.

The daemon checks it, the operator and the trainer present it; all of them read it the same way
(a mounted Secret's file, else $WEIGHTSYNC_AUTH_TOKEN) and clean it the same way, so that both
sources give the same token. Torch-free and HTTP-free, so that the operator, which runs without
PyTorch, reads it from the same place as the daemons.

Why the rules: a Secret made with `kubectl create secret --from-file` holds the file's trailing
newline, and the chart hands the Secret to the daemon through the variable, so surrounding
whitespace is dropped from both sources. A token travels in an `Authorization: Bearer` header,
whose value HTTP carries as bytes that servers read as Latin-1: a token with characters outside
visible ASCII (RFC 6750's b64token is a subset of it) could never be presented byte for byte by
every client, so it is refused at start instead of answering 401 to everyone.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

TOKEN_ENV = "WEIGHTSYNC_AUTH_TOKEN"
MIN_TOKEN_LENGTH = 16  # shorter tokens are warned about: guessable

log = logging.getLogger("weightsync.tokens")


class TokenError(ValueError):
    """A configured token that cannot work: refused at start, naming where it came from."""


def clean_token(raw: str, source: str) -> str:
    """`raw` without surrounding whitespace; TokenError if nothing is left or a character could
    not travel in an Authorization header (only visible ASCII, 0x21-0x7E, can)."""
    token = raw.strip()
    if not token:
        raise TokenError(f"{source} holds no token (it is empty or only whitespace)")
    bad = sorted({ch for ch in token if not "!" <= ch <= "~"})
    if bad:
        shown = ", ".join(f"U+{ord(ch):04X}" for ch in bad[:5])
        raise TokenError(f"{source}: a bearer token may hold only visible ASCII characters (it travels in an "
                         f"HTTP header); found {shown}")
    if len(token) < MIN_TOKEN_LENGTH:
        log.warning("the token from %s has %d characters: a short token is easy to guess (use %d or more)",
                    source, len(token), MIN_TOKEN_LENGTH)
    return token


def load_token(token_file: Path | None = None) -> str | None:
    """The token from `token_file` (e.g. a mounted Secret) or $WEIGHTSYNC_AUTH_TOKEN, cleaned by
    `clean_token`; None when neither is set (an empty variable counts as unset). Warns when the
    file is readable by every user of the host."""
    if token_file is not None:
        warn_if_world_readable(token_file)
        return clean_token(token_file.read_text(encoding="utf-8", errors="replace"), f"token file {token_file}")
    raw = os.environ.get(TOKEN_ENV)
    if not raw:
        return None
    return clean_token(raw, f"${TOKEN_ENV}")


def warn_if_world_readable(path: Path) -> None:
    """A token file that any local user can read hands them the weights: say so at start."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # reading it fails next, with the reason
    if mode & stat.S_IROTH:
        log.warning("token file %s is readable by every user of this host (mode %s): chmod o-r it, or mount "
                    "the Secret with defaultMode 0400", path, oct(stat.S_IMODE(mode)))
