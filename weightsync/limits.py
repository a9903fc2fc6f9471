"""The protocol's numeric limits, and sizes as command lines write them; torch-free.

The packed-buffer bounds are checked in three places that must agree: the wire models
(`weightsync.protocol.InitInfo`), the command lines, and the operator's CRD models. The operator
runs without PyTorch, so the bounds live here, where importing them pulls in pydantic only.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

DEFAULT_BUFFER_SIZE_BYTES = 1 << 30  # 1 GiB, as vLLM
DEFAULT_NUM_BUFFERS = 2
MAX_NUM_BUFFERS = 16
MIN_BUFFER_SIZE_BYTES = 1 << 10
MAX_BUFFER_SIZE_BYTES = 1 << 36

BufferSize = Annotated[int, Field(ge=MIN_BUFFER_SIZE_BYTES, le=MAX_BUFFER_SIZE_BYTES, multiple_of=8)]
NumBuffers = Annotated[int, Field(ge=1, le=MAX_NUM_BUFFERS)]


def parse_size(text: str) -> int:
    """Bytes from a command-line size: '1048576', '512KiB', '64MiB', '1GiB'."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * factor)
    return int(lowered)
