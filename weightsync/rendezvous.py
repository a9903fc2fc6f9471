"""Each transfer group's own rendezvous: a TCPStore hosted by the trainer (rank 0).

Groups never touch torch.distributed's global default group, so a trainer that already uses
torch.distributed for training, or two WeightSyncs in one process, cannot collide.
"""

from __future__ import annotations

import datetime

import torch.distributed as dist

from weightsync.errors import TransferError
from weightsync.protocol import InitInfo


def open_store(init: InitInfo, rank: int) -> dist.Store:
    """Host (rank 0) or join the group's key-value store, prefixed by the group's name."""
    if init.master_address is None or init.master_port is None:
        raise TransferError("this transport needs master_address and master_port")
    timeout = datetime.timedelta(seconds=init.timeout_seconds)
    try:
        store = dist.TCPStore(
            init.master_address,
            init.master_port,
            world_size=init.world_size,
            is_master=rank == 0,
            timeout=timeout,
            wait_for_workers=False,
        )
    except Exception as error:  # torch raises RuntimeError/DistStoreError subclasses
        raise TransferError(
            f"rendezvous at {init.master_address}:{init.master_port} failed for rank {rank}: {error}"
        ) from error
    return dist.PrefixStore(f"{init.group_name}/", store)
