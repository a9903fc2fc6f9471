"""Each transfer group's own rendezvous: a TCPStore hosted by the trainer (rank 0).

Groups never touch torch.distributed's global default group, so a trainer that already uses
torch.distributed for training, or two WeightSyncs in one process, cannot collide.
"""

from __future__ import annotations

import datetime
import threading
import weakref

import torch.distributed as dist

from weightsync.errors import TransferError
from weightsync.protocol import InitInfo


def open_store(init: InitInfo, rank: int) -> dist.Store:
    """Host (rank 0) or join the group's key-value store, prefixed by the group's name."""
    if init.master_address is None or init.master_port is None:
        raise TransferError("this transport needs master_address and master_port")
    timeout = datetime.timedelta(seconds=init.init_timeout_seconds)
    try:
        store = _hosted_store(init.master_port, timeout) if rank == 0 else dist.TCPStore(
            init.master_address, init.master_port, is_master=False, timeout=timeout)
    except Exception as error:  # torch raises RuntimeError/DistStoreError subclasses
        raise TransferError(
            f"rendezvous at {init.master_address}:{init.master_port} failed for rank {rank}: {error}"
        ) from error
    prefixed = dist.PrefixStore(f"{init.group_name}/", store)
    if rank == 0:
        weakref.finalize(prefixed, _release_hosted, init.master_port)
    _barrier(prefixed, rank, init.world_size, timeout)
    return prefixed


_HOSTED: dict[int, list] = {}  # port → [store server, groups using it]
_HOSTED_LOCK = threading.Lock()


def _hosted_store(port: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """The trainer's store server on `port`, shared by every group that lives on it.

    Each group uses its own key prefix. A new group opened before the old one is closed (as a
    re-init does) reuses the running server instead of re-binding the port, which would race with
    the old server's shutdown; the server stops once no group uses it, freeing the port.
    """
    with _HOSTED_LOCK:
        entry = _HOSTED.get(port)
        if entry is None:
            store = dist.TCPStore("0.0.0.0", port, is_master=True, timeout=timeout, wait_for_workers=False)
            entry = _HOSTED[port] = [store, 0]
        else:
            entry[0].set_timeout(timeout)
        entry[1] += 1
        return entry[0]


def _release_hosted(port: int) -> None:
    with _HOSTED_LOCK:
        entry = _HOSTED.get(port)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del _HOSTED[port]


def _barrier(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta) -> None:
    """Wait (up to the init timeout) until every rank has joined.

    Parties may arrive far apart (one still finishing a failed round); once all are here, the
    communicator's own setup, bounded by the shorter collective timeout, finds every peer.
    """
    store.set(f"joined/{rank}", "1")
    try:
        store.wait([f"joined/{r}" for r in range(world_size)], timeout)
    except Exception as error:
        raise TransferError(f"rank {rank}: not every rank joined within {timeout.total_seconds():g}s: {error}") from error
