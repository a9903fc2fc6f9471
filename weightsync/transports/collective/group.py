"""The communicator a collective round runs over (gloo on CPU, NCCL on GPU), and who this party is.

A `Group` is the only thing that moves bytes between parties; every other part of a round (the
agreement, the header, the sender and the receiver) reaches its peers through it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from weightsync.protocol import InitInfo

if TYPE_CHECKING:
    from weightsync.transports.collective.transport import CollectiveOptions


class Pending(ABC):
    """A started collective; `wait` blocks (bounded by the group's timeout) until it is done."""

    @abstractmethod
    def wait(self) -> None: ...


class Group(ABC):
    """The few collectives a round needs, over one transport's own communicator."""

    rank: int
    world_size: int
    device: torch.device

    @abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Pending:
        """Start broadcasting `tensor` from `src`; the returned handle waits for it."""

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of a same-shaped tensor (blocking)."""

    def gather_to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's copy of `tensor`, stacked, in host memory (blocking, bounded)."""
        return torch.stack([t.cpu() for t in self.all_gather(tensor)])

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def empty(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor on this group's device to receive into."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of a tensor whose producing collective was waited for."""
        return tensor.cpu()

    def synchronize(self) -> None:  # noqa: B027 (an optional hook: the default does nothing)
        """Wait until queued copies on this group's device are done (a no-op on CPU)."""

    def check_usable(self) -> None:  # noqa: B027 (an optional hook: the default does nothing)
        """Raise TransferError at once if an earlier failure ended this group."""

    def fail(self) -> None:  # noqa: B027 (an optional hook: the default does nothing)
        """A step of the round timed out: the parties are out of step, so the group is over."""

    @abstractmethod
    def close(self) -> None: ...


@dataclass
class Party:
    """What every part of one party's rounds reads: its init (which a benchmark may swap between
    rounds, so the parts read it here rather than keeping a copy), rank, device, options and group.
    Kept in one place so that the sender or receiver and its data path never disagree on them."""

    init: InitInfo
    rank: int
    device: torch.device
    group: Group
    options: CollectiveOptions | None = None
