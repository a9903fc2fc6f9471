"""What a transport's round header says about how its round moves: the header model, the
trainer's values of the transport's own header fields, and what both ends derive from a header
alike (whether pieces move directly, which bytes move ahead of the agreement)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from weightsync.layout import Chunk
from weightsync.protocol import RoundHeader


HeaderT = TypeVar("HeaderT", bound=RoundHeader)


class RoundRules(Generic[HeaderT]):
    """The core rules (the cpu transport's): the core header, every round packed, nothing ahead
    of the agreement. A transport with header fields of its own subclasses it (`HeaderT`: its
    header model); the sender and the receiver both consult the same object, so both ends derive
    the same plan from a header."""

    # How round headers decode, strictly: a transport with header fields of its own subclasses it.
    header_model: type[RoundHeader] = RoundHeader

    def header_fields(self, lendable: bool, streamed: bool) -> dict[str, Any]:
        """The trainer's values of the transport's own header fields (`header_model`) for a round
        whose sources are `lendable` (the caller's own contiguous tensors) or `streamed` (from a
        source's iteration); none by default."""
        return {}

    def is_direct(self, header: HeaderT) -> bool:
        """Whether each tensor piece of this round moves on its own, from where it lives to where
        it belongs, instead of through packed buffers (nccl's direct rounds); never by default."""
        return False

    def lead_pieces(self, chunks: Sequence[Chunk], header: HeaderT) -> list[int]:
        """Byte counts of the broadcasts that move ahead of the agreement, in order: a transport
        that overlaps the agreement with its first chunk names them (both ends derive them from
        the header alike); none by default."""
        return []

