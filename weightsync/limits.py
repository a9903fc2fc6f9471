"""The protocol's numeric limits, and sizes as command lines write them; torch-free.

The packed-buffer bounds are checked in three places that must agree: the wire models
(`weightsync.protocol.InitInfo`), the command lines, and the operator's CRD models. The operator
runs without PyTorch, so the bounds live here, where importing them pulls in pydantic only.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, Strict

DEFAULT_BUFFER_SIZE_BYTES = 1 << 30  # 1 GiB, as vLLM
DEFAULT_NUM_BUFFERS = 2
MAX_NUM_BUFFERS = 16
MIN_BUFFER_SIZE_BYTES = 1 << 10
MAX_BUFFER_SIZE_BYTES = 1 << 36

BufferSize = Annotated[int, Field(ge=MIN_BUFFER_SIZE_BYTES, le=MAX_BUFFER_SIZE_BYTES, multiple_of=8)]
NumBuffers = Annotated[int, Field(ge=1, le=MAX_NUM_BUFFERS)]
# The same bounds where a caller's JSON is validated: a number must be a JSON number, never a
# string or a boolean (pydantic's lax mode would read "2" as 2 and true as 1).
StrictBufferSize = Annotated[BufferSize, Strict()]
StrictNumBuffers = Annotated[NumBuffers, Strict()]

MAX_LABEL_LENGTH = 256  # a version label, a group name, an abort reason: echoed by /healthz and logs


def printable(value: str) -> str:
    """Refuse text that would not read as itself where it is echoed (/healthz, logs, events):
    control characters (NUL, CR/LF: forged log lines), format characters (U+202E reverses what
    follows), separators other than the space."""
    bad = [ch for ch in value if not ch.isprintable()]
    if bad:
        raise ValueError(f"must be printable text; found U+{ord(bad[0]):04X} (no control, format or "
                         "line-separator characters)")
    return value


Printable = AfterValidator(printable)
# A caller's label: a JSON string (never a number) of 1 to MAX_LABEL_LENGTH printable characters.
Label = Annotated[str, Strict(), Field(min_length=1, max_length=MAX_LABEL_LENGTH), Printable]


def parse_size(text: str) -> int:
    """Bytes from a command-line size: '1048576', '512KiB', '64MiB', '1GiB'."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * factor)
    return int(lowered)
