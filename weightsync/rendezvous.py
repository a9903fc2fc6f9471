"""Each transfer group's own rendezvous: a TCPStore hosted by the trainer (rank 0).

Groups never touch torch.distributed's global default group, so a trainer that already uses
torch.distributed for training, or two WeightSyncs in one process, cannot collide.
"""

from __future__ import annotations

import datetime
import threading

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
    _barrier(prefixed, rank, init.world_size, timeout)
    return prefixed


_HOSTED: dict[int, dist.TCPStore] = {}
_HOSTED_LOCK = threading.Lock()


def _hosted_store(port: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """The trainer's store server on `port`, started once and kept for the process's life.

    Each group uses its own key prefix in it. Re-binding the port for every new group would race
    with the previous server still shutting down (its group may be stuck behind a lost peer).
    """
    with _HOSTED_LOCK:
        store = _HOSTED.get(port)
        if store is None:
            store = dist.TCPStore("0.0.0.0", port, is_master=True, timeout=timeout, wait_for_workers=False)
            _HOSTED[port] = store
        else:
            store.set_timeout(timeout)
        return store


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
