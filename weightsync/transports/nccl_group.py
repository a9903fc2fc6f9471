"""The nccl transport's `Group`: broadcast and all-gather over an NCCL communicator of its own.

The communicator comes from its own rendezvous (the trainer's TCPStore, or a unique id the
trainer minted itself, `nccl_unique_id_b64`), never from torch.distributed's default group, so a
training job's own collectives and several weight-sync groups in one process never meet. Every
host wait is bounded by the group's timeout, and a timeout aborts the communicator, which
cancels its kernels: a dead peer makes the survivors fail instead of hanging.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import time
from collections.abc import Sequence
import torch

from weightsync.errors import TransferError
from weightsync.protocol import InitInfo
from weightsync.rendezvous import open_store
from weightsync.transports.collective import Group, Pending, mark
from weightsync.transports.nccl_lib import Communicator, new_unique_id
from weightsync.transports.nccl_options import NcclOptions
from weightsync.transports.waits import wait_event_until

UNIQUE_ID_KEY = "nccl_unique_id"


def wait_event(event: torch.cuda.Event, comm: Communicator, what: str) -> None:
    """Wait for `event` at most the group's timeout; on a failure or timeout abort `comm`
    (which cancels its kernels, so nothing stays queued behind a dead peer)."""
    if comm.aborted:
        raise TransferError(f"{what}: the group was aborted after an earlier failure; init it again")
    last_check = [time.monotonic()]

    def check_peers(now: float) -> None:
        if now - last_check[0] > 0.05:  # a remote failure may be known to NCCL before any timeout
            last_check[0] = now
            state = comm.async_error()
            if state not in (0, 7):
                comm.abort()
                raise TransferError(f"{what}: NCCL reported error {state} (a peer failed); the group was aborted")

    try:
        wait_event_until(event, time.monotonic() + comm.timeout, what, check_peers)
    except TransferError as error:
        if not comm.aborted:
            comm.abort()
            raise TransferError(f"{error} (a peer is missing or stopped); the group was aborted") from None
        raise


class EventPending(Pending):
    """A handle on GPU work recorded as an event on the group's stream, waited for within the
    group's timeout (`wait_event`)."""

    def __init__(self, event: torch.cuda.Event, comm: Communicator, what: str):
        self._event, self._comm, self._what = event, comm, what

    def wait(self) -> None:
        wait_event(self._event, self._comm, self._what)


class NcclGroup(Group):
    """Broadcast and all-gather over one NCCL communicator, on a dedicated high-priority stream."""

    def __init__(self, init: InitInfo, rank: int, device: torch.device, options: NcclOptions):
        if device.type != "cuda":
            raise TransferError(f"the nccl transport needs a CUDA device, not {device}")
        self._options = options
        self.rank, self.world_size = rank, init.world_size
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        # the group's TCPStore; None for a group from a minted id
        self.rendezvous_store: torch.distributed.Store | None = None
        with torch.cuda.device(self.device):
            unique_id = self._unique_id(init, rank)
            # The control steps (header, agreements) go over the rendezvous store when there is one:
            # host to host, they cost a fraction of a collective's launch and completion round trip.
            # (options.control "communicator" keeps them on the communicator, for comparison.)
            use_store = self.rendezvous_store is not None and options.control == "store"
            self.control_store = self.rendezvous_store if use_store else None
            if self.rendezvous_store is not None:  # from now on a control step waits at most the group's timeout
                self.rendezvous_store.set_timeout(datetime.timedelta(seconds=init.timeout_seconds))
            self.comm = Communicator(unique_id, rank, init.world_size, init.timeout_seconds, options.blocking)
            # Collectives jump ahead of packing and checksum kernels when both wait for SMs.
            self.stream = torch.cuda.Stream(self.device, priority=-1)
            if init.nccl_unique_id_b64 is not None:
                self._warm_up()  # trainers that mint the id issue this first (vLLM's convention)

    def _unique_id(self, init: InitInfo, rank: int) -> bytes:
        if init.nccl_unique_id_b64 is not None:
            try:
                return base64.b64decode(init.nccl_unique_id_b64, validate=True)
            except (binascii.Error, ValueError):
                raise TransferError("init_info.nccl_unique_id_b64 is not standard base64") from None
        store = self.rendezvous_store = open_store(init, rank, self._options.agreed())
        if rank == 0:
            store.set(UNIQUE_ID_KEY, base64.b64encode(new_unique_id()))  # type: ignore[arg-type]  # takes bytes too
            return base64.b64decode(store.get(UNIQUE_ID_KEY))
        try:
            return base64.b64decode(store.get(UNIQUE_ID_KEY))
        except Exception as error:  # the store raises on its timeout
            raise TransferError(f"rank {rank} got no NCCL unique id from the trainer: {error}") from error

    def _warm_up(self) -> None:
        one = torch.zeros(1, dtype=torch.float32, device=self.device)
        self.after_current()
        self.comm.all_reduce_float(one.data_ptr(), 1, self.stream.cuda_stream)
        self.event("warm-up all_reduce").wait()

    def after_current(self) -> None:
        """Order the group's stream after the caller's (current) stream."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def event(self, what: str) -> EventPending:
        """A handle on everything enqueued on the group's stream so far."""
        event = torch.cuda.Event()
        event.record(self.stream)
        return EventPending(event, self.comm, what)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Pending:
        self.after_current()
        self.comm.broadcast(tensor.data_ptr(), tensor.numel() * tensor.element_size(), src, self.stream.cuda_stream)
        tensor.record_stream(self.stream)
        return self.event("broadcast")

    def broadcast_on_stream(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Enqueue a broadcast on the group's stream with no dependency on the current stream
        (the payload pipeline orders it with events) and no host wait."""
        self.comm.broadcast(tensor.data_ptr(), tensor.numel() * tensor.element_size(), src, self.stream.cuda_stream)

    def broadcast_pieces(self, pieces: Sequence[torch.Tensor], src: int = 0) -> None:
        """Enqueue one broadcast per piece as one NCCL group (a single launch) on the group's
        stream, ordered like `broadcast_on_stream`."""
        self.comm.group_start()
        try:
            for piece in pieces:
                self.comm.broadcast(piece.data_ptr(), piece.numel() * piece.element_size(), src,
                                    self.stream.cuda_stream)
        finally:
            self.comm.group_end()

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        out = self._all_gather(tensor)
        return list(out.view(self.world_size, -1))

    def gather_to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_gather(tensor).view(self.world_size, -1).cpu()

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        out = torch.empty(self.world_size * tensor.numel(), dtype=tensor.dtype, device=self.device)
        self.after_current()
        self.comm.all_gather(tensor.data_ptr(), out.data_ptr(), nbytes, self.stream.cuda_stream)
        mark("all_gather called")
        tensor.record_stream(self.stream)
        out.record_stream(self.stream)
        self.event("all_gather").wait()
        return out

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device)

    def synchronize(self) -> None:
        self.after_current()
        self.event("synchronize").wait()

    def check_usable(self) -> None:
        if self.comm.aborted:
            raise TransferError("the group was aborted after an earlier failure; init it again")

    def fail(self) -> None:
        self.comm.abort()  # later steps then fail at once, saying the group was aborted

    def close(self) -> None:
        self.comm.abort()  # local teardown; never waits for peers
        self.rendezvous_store = self.control_store = None
