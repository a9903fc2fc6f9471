"""The cpu transport: the collective round over a gloo process group of its own.

It runs wherever torch runs, so the whole product (daemon, coordinator, operator, demo) is
exercised on machines without a GPU; the GPU transports reuse the same round. It is the
collective round (`weightsync.transports.collective`) with its defaults: the core header and
the packed data paths, over a `GlooGroup`.
"""

from __future__ import annotations

import datetime
import ipaddress
from typing import Any

import torch
import torch.distributed as dist

from weightsync.errors import TransferError
from weightsync.protocol import InitInfo
from weightsync.rendezvous import open_store
from weightsync.transports.base import Transport
from weightsync.transports.collective import CollectiveOptions, CollectiveTransport, Group, Pending
from weightsync.transports.options import TransportOptions


class _GlooWork(Pending):
    def __init__(self, work: dist.Work, timeout: datetime.timedelta):
        self._work = work
        self._timeout = timeout

    def wait(self) -> None:
        try:
            self._work.wait(self._timeout)
        except Exception as error:  # gloo raises RuntimeError on timeout or a lost peer
            raise TransferError(f"gloo collective failed: {error}") from error


class GlooGroup(Group):
    """Broadcast and all-gather over a gloo process group of its own (never the default group)."""

    def __init__(self, init: InitInfo, rank: int, options: TransportOptions | None = None):
        """`options`: this party's transport options, agreed with every party's at the join."""
        self.rank = rank
        self.world_size = init.world_size
        self.device = torch.device("cpu")
        self._timeout = datetime.timedelta(seconds=init.timeout_seconds)
        self._store: dist.Store | None = open_store(init, rank, None if options is None else options.agreed())
        # torch's stubs lack ProcessGroupGloo's _Options (and its collectives, below).
        gloo_options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        gloo_options._timeout = self._timeout
        gloo_options._devices = [_gloo_device(init.master_address)]
        try:
            self._pg: dist.ProcessGroupGloo | None = dist.ProcessGroupGloo(self._store, rank, init.world_size,
                                                                          gloo_options)
        except Exception as error:
            raise TransferError(f"gloo group setup failed for rank {rank}: {error}") from error

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Pending:
        options = dist.BroadcastOptions()
        options.rootRank = src
        options.rootTensor = 0
        options.timeout = self._timeout
        return _GlooWork(self._live().broadcast([tensor], options), self._timeout)  # type: ignore[attr-defined]

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        outputs = [torch.empty_like(tensor) for _ in range(self.world_size)]
        _GlooWork(self._live().allgather([outputs], [tensor]), self._timeout).wait()  # type: ignore[attr-defined]
        return outputs

    def send(self, tensor: torch.Tensor, dst: int) -> _GlooWork:
        """Start sending a contiguous CPU tensor to rank `dst` (point to point: a planned round,
        where each trainer rank sends its own bytes); the handle's `wait` is bounded."""
        return _GlooWork(self._live().send([tensor], dst, 0), self._timeout)  # type: ignore[attr-defined]

    def recv(self, tensor: torch.Tensor, src: int) -> _GlooWork:
        """Start receiving into a contiguous CPU tensor from rank `src` (in the order `src` sent)."""
        return _GlooWork(self._live().recv([tensor], src, 0), self._timeout)  # type: ignore[attr-defined]

    @property
    def store(self) -> dist.Store | None:
        """The group's rendezvous store (hosted by rank 0), until `close`."""
        return self._store

    def abort(self) -> None:
        """End every pending operation at once (a failed round); the store stays until `close`,
        so a party can still tell the others why."""
        if self._pg is not None:
            try:
                self._pg.abort()
            except Exception:  # already broken or shut down
                pass

    def _live(self) -> dist.ProcessGroupGloo:
        if self._pg is None:
            raise TransferError("the gloo group was closed")
        return self._pg

    def close(self) -> None:
        # Abort first: a group whose peer vanished may still hold a pending operation, and only
        # an aborted group releases its threads (and the rendezvous port) without waiting on it.
        if self._pg is not None:
            try:
                self._pg.abort()
            except Exception:  # already broken or shut down: nothing left to release
                pass
        self._pg = None
        self._store = None


def _gloo_device(master_address: str | None) -> Any:  # a gloo device (untyped in torch's stubs)
    """Loopback groups stay on loopback; others use the host's default interface
    (GLOO_SOCKET_IFNAME picks another)."""
    try:
        loopback = master_address is not None and (
            master_address == "localhost" or ipaddress.ip_address(master_address).is_loopback
        )
    except ValueError:
        loopback = False
    if loopback:
        return dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")
    return dist.ProcessGroupGloo.create_default_device()


class CpuOptions(CollectiveOptions):
    """The cpu transport's init_info.options: those of every collective transport (`ramp`, off
    by default: gloo gains nothing from small first and last chunks)."""


class CpuTransport(CollectiveTransport):
    """The collective round over gloo, with the core rules and the packed paths."""

    name = "cpu"
    options_model = CpuOptions

    @classmethod
    def connect(cls, init: InitInfo, rank: int, device: torch.device | None = None) -> Transport:
        """Join the group; a receiver of a planned group (`init.trainer_ranks`) joins it as one."""
        if init.trainer_ranks is not None:
            from weightsync.planned_api import PlannedReceiver  # it builds on this module

            return PlannedReceiver.connect(init, rank)
        options = cls.options_model.of(init)  # refused before joining when invalid
        return cls(init, rank, torch.device("cpu"), GlooGroup(init, rank, options))
