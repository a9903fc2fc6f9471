"""Each transfer group's own rendezvous: a TCPStore hosted by the trainer (rank 0).

Groups never touch torch.distributed's global default group, so a trainer that already uses
torch.distributed for training, or two WeightSyncs in one process, cannot collide.

Joining is bounded as a whole: resolving the trainer's name, reaching its store and waiting for
every rank share one deadline, `init_timeout_seconds` from the start (torch's own client retries
name resolution past its timeout, about three times over). Each step also polls a cancel event
(see `cancellable`), so a daemon can give up a pending join at once when told to abort or close.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist

from weightsync.errors import OptionMismatch, TransferError
from weightsync.protocol import InitInfo

POLL_SECONDS = 0.05  # how often a pending join looks at its cancel event
RESOLVE_RETRY_SECONDS = 0.5  # between lookups of a name that does not resolve (yet)


class JoinCancelled(TransferError):
    """A pending join was given up on request (the daemon was told to abort or close)."""


_local = threading.local()


@contextmanager
def cancellable(event: threading.Event) -> Iterator[None]:
    """Joins started on this thread inside the block give up (JoinCancelled) once `event` is set.

    A thread-local rather than a parameter: transports call `open_store` from their own setup,
    and only the daemon, which runs that setup on its worker thread, needs to cancel it."""
    previous = getattr(_local, "cancel", None)
    _local.cancel = event
    try:
        yield
    finally:
        _local.cancel = previous


class _Deadline:
    def __init__(self, seconds: float, rank: int):
        self.seconds, self.rank = seconds, rank
        self.end = time.monotonic() + seconds
        self.cancel: threading.Event | None = getattr(_local, "cancel", None)

    def left(self, what: str) -> float:
        """Seconds left; raises once cancelled or past the deadline."""
        if self.cancel is not None and self.cancel.is_set():
            raise JoinCancelled(f"rank {self.rank}: joining the group was cancelled while {what}")
        left = self.end - time.monotonic()
        if left <= 0:
            raise TransferError(f"rank {self.rank}: init_timeout_seconds ({self.seconds:g}s) passed while {what}")
        return left

    def pause(self, what: str, seconds: float = POLL_SECONDS) -> None:
        """Wait `seconds` (less at the deadline; at once when cancelled), then check both."""
        wait = min(seconds, self.left(what))
        if self.cancel is not None:
            self.cancel.wait(wait)
        else:
            time.sleep(wait)
        self.left(what)


def open_store(init: InitInfo, rank: int, options: Mapping[str, object] | None = None) -> dist.Store:
    """Host (rank 0) or join the group's key-value store, prefixed by the group's name.

    `options`: this party's transport options with their defaults filled in (JSON values). Each
    rank's join key carries them, so once everyone is here every rank compares every rank's with
    the trainer's and, on a difference, fails naming the option and both values (see
    `agree_options`): all parties see the same facts, so all of them refuse the group."""
    if init.master_address is None or init.master_port is None:
        raise TransferError("this transport needs master_address and master_port")
    deadline = _Deadline(init.init_timeout_seconds, rank)
    timeout = datetime.timedelta(seconds=init.init_timeout_seconds)
    where = f"{init.master_address}:{init.master_port}"
    if rank == 0:
        try:
            store = _hosted_store(init.master_port, timeout)
        except Exception as error:  # torch raises RuntimeError/DistStoreError subclasses
            raise TransferError(f"rendezvous at {where} failed for rank {rank}: {error}") from error
    else:
        address = _resolve(init.master_address, init.master_port, deadline)
        _reachable(address, init.master_port, deadline, where)
        try:
            store = dist.TCPStore(address, init.master_port, is_master=False,
                                  timeout=datetime.timedelta(seconds=deadline.left(f"connecting to {where}")))
        except Exception as error:
            raise TransferError(f"rendezvous at {where} failed for rank {rank}: {error}") from error
        store.set_timeout(timeout)  # later uses of the store (the group's setup) as before
    prefixed = dist.PrefixStore(f"{init.group_name}/", store)
    if rank == 0:
        weakref.finalize(prefixed, _release_hosted, init.master_port)
    joined = "1" if options is None else json.dumps(dict(options), sort_keys=True)
    _barrier(prefixed, rank, init.world_size, deadline, joined)
    if options is not None:
        keys = [f"joined/{r}" for r in range(init.world_size)]
        try:
            rows = prefixed.multi_get(keys)
        except Exception as error:  # the store raises when the trainer's server went away
            raise TransferError(f"rank {rank}: the rendezvous store failed while comparing options: {error}") from error
        agree_options([_decode_options(row) for row in rows])
    return prefixed


def _decode_options(row: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(row)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def agree_options(by_rank: list[dict[str, Any] | None]) -> None:
    """Raise OptionMismatch unless every rank's options equal the trainer's (rank 0's), naming
    each differing option with the trainer's value and every other value held (None: a party
    that carried no options, e.g. another weightsync version)."""
    trainer = by_rank[0]
    if trainer is None:
        raise OptionMismatch("init_info.options", "the trainer (rank 0) joined without transport options")
    problems: dict[str, list[str]] = {}
    for rank, mine in enumerate(by_rank[1:], start=1):
        if mine is None:
            problems.setdefault("", []).append(f"rank {rank} carried none")
            continue
        for name in sorted(trainer.keys() | mine.keys()):
            theirs, ours = trainer.get(name, "<absent>"), mine.get(name, "<absent>")
            if theirs != ours:
                problems.setdefault(name, []).append(
                    f"rank {rank} has {json.dumps(ours)}, the trainer (rank 0) has {json.dumps(theirs)}")
    if problems:
        parts = [f"{name or 'options'}: {'; '.join(found)}" for name, found in problems.items()]
        field = "init_info.options" + (f".{next(iter(problems))}" if next(iter(problems)) else "")
        raise OptionMismatch(field, "every party must join with the same transport options: " + "; ".join(parts))


def _resolve(host: str, port: int, deadline: _Deadline) -> str:
    """The address `host` resolves to. A name that does not resolve yet is looked up again until
    the deadline (a trainer's DNS record may appear only once its pod is up). Each lookup runs on a
    helper thread that is abandoned, not waited for, once the deadline passes or the join is
    cancelled: a lookup cannot be interrupted."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    what = f"resolving {host!r}"
    last: OSError | None = None
    while True:
        found: dict[str, Any] = {}
        done = threading.Event()

        def lookup(found: dict[str, Any] = found, done: threading.Event = done) -> None:
            try:
                found["addresses"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as error:
                found["error"] = error
            done.set()

        threading.Thread(target=lookup, name=f"weightsync-resolve-{host[:32]}", daemon=True).start()
        try:
            while not done.wait(min(POLL_SECONDS, deadline.left(what))):
                pass
            if "addresses" in found:
                addresses = sorted(found["addresses"], key=lambda a: a[0] != socket.AF_INET)  # IPv4 first
                return str(addresses[0][4][0])
            last = found["error"]
            deadline.pause(what, RESOLVE_RETRY_SECONDS)
        except JoinCancelled:
            raise
        except TransferError as error:
            reason = f"master_address {host!r} does not resolve ({last})" if last else str(error)
            raise TransferError(f"rank {deadline.rank}: {reason}; gave up after init_timeout_seconds "
                                f"({deadline.seconds:g}s)") from None


def _reachable(address: str, port: int, deadline: _Deadline, where: str) -> None:
    """Wait until the trainer's store accepts connections (it may start after this rank)."""
    what = f"connecting to {where}"
    while True:
        try:
            socket.create_connection((address, port), timeout=min(1.0, deadline.left(what))).close()
            return
        except OSError:
            deadline.pause(what)


_HOSTED: dict[int, list[Any]] = {}  # port → [store server, groups using it]
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
        hosted: dist.TCPStore = entry[0]
        return hosted


def _release_hosted(port: int) -> None:
    with _HOSTED_LOCK:
        entry = _HOSTED.get(port)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del _HOSTED[port]


def _barrier(store: dist.Store, rank: int, world_size: int, deadline: _Deadline, joined: str = "1") -> None:
    """Wait (until the init deadline) until every rank has joined.

    Parties may arrive far apart (one still finishing a failed round); once all are here, the
    communicator's own setup, bounded by the shorter collective timeout, finds every peer.
    """
    keys = [f"joined/{r}" for r in range(world_size)]
    what = "waiting for every rank to join"
    try:
        store.set(f"joined/{rank}", joined)
        while not store.check(keys):
            try:
                deadline.pause(what)
            except JoinCancelled:
                raise
            except TransferError as error:
                missing = [r for r, key in enumerate(keys) if not store.check([key])]
                raise TransferError(f"{error} (ranks still missing: {missing})") from None
    except TransferError:
        raise
    except Exception as error:  # the store raises when the trainer's server went away
        raise TransferError(f"rank {rank}: the rendezvous store failed while {what}: {error}") from error
