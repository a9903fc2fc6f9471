"""A thin ctypes binding of the NCCL calls a transfer group needs, on the library torch loaded.

Why not torch.distributed's NCCL process group: a weight-transfer group must be its own
communicator (never the trainer's default group), accept a unique id minted by the trainer
(`nccl_unique_id_b64`), run each broadcast on a stream we choose, and — above all — never hang:
a dead peer must make the survivors fail within the group's timeout. A non-blocking
communicator plus `ncclCommAbort` gives exactly that, with no watchdog thread that kills the
process.
"""

from __future__ import annotations

import ctypes
import os
import time

from weightsync.errors import TransferError

SUCCESS, IN_PROGRESS = 0, 7
UINT8, FLOAT32 = 1, 7
SUM = 0
UNIQUE_ID_BYTES = 128
_CONFIG_MAGIC = 0xCAFEBEEF
_CONFIG_VERSION = 21700  # the layout below is NCCL 2.17's; newer NCCL fills the rest with defaults
_UNDEF_INT = -(2**31)

_RESULTS = {1: "unhandled CUDA error", 2: "system error", 3: "internal error", 4: "invalid argument",
            5: "invalid usage", 6: "remote error (a peer failed)", 7: "in progress"}


class UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * UNIQUE_ID_BYTES)]


class _Config(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("magic", ctypes.c_uint), ("version", ctypes.c_uint),
                ("blocking", ctypes.c_int), ("cgaClusterSize", ctypes.c_int), ("minCTAs", ctypes.c_int),
                ("maxCTAs", ctypes.c_int), ("netName", ctypes.c_char_p), ("splitShare", ctypes.c_int)]


_lib = None


def library() -> ctypes.CDLL:
    """libnccl as loaded by torch (same version, same process), or WEIGHTSYNC_NCCL_LIBRARY."""
    global _lib
    if _lib is not None:
        return _lib
    import torch  # noqa: F401 - loading torch's CUDA libraries makes libnccl.so.2 resolvable

    candidates = [os.environ.get("WEIGHTSYNC_NCCL_LIBRARY"), "libnccl.so.2", "libnccl.so"]
    try:
        import nvidia.nccl  # the wheel torch depends on

        for root in nvidia.nccl.__path__:
            candidates.append(os.path.join(root, "lib", "libnccl.so.2"))
    except ImportError:
        pass
    errors = []
    for path in filter(None, candidates):
        try:
            lib = ctypes.CDLL(path)
            break
        except OSError as error:
            errors.append(str(error))
    else:
        raise TransferError("cannot load the NCCL library: " + "; ".join(errors))
    comm, stream, ptr = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
    result = ctypes.c_int
    signatures = {
        "ncclGetVersion": (result, [ctypes.POINTER(ctypes.c_int)]),
        "ncclGetUniqueId": (result, [ctypes.POINTER(UniqueId)]),
        "ncclCommInitRank": (result, [ctypes.POINTER(comm), ctypes.c_int, UniqueId, ctypes.c_int]),
        "ncclCommInitRankConfig": (result, [ctypes.POINTER(comm), ctypes.c_int, UniqueId, ctypes.c_int,
                                            ctypes.POINTER(_Config)]),
        "ncclCommGetAsyncError": (result, [comm, ctypes.POINTER(ctypes.c_int)]),
        "ncclCommAbort": (result, [comm]),
        "ncclBroadcast": (result, [ptr, ptr, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, comm, stream]),
        "ncclAllGather": (result, [ptr, ptr, ctypes.c_size_t, ctypes.c_int, comm, stream]),
        "ncclAllReduce": (result, [ptr, ptr, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, comm, stream]),
        "ncclGetErrorString": (ctypes.c_char_p, [ctypes.c_int]),
        "ncclGroupStart": (result, []),
        "ncclGroupEnd": (result, []),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    _lib = lib
    return lib


def version() -> int:
    value = ctypes.c_int()
    library().ncclGetVersion(ctypes.byref(value))
    return value.value


def new_unique_id() -> bytes:
    uid = UniqueId()
    _check(library().ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
    return bytes(bytearray(uid.internal))


def _check(code: int, what: str) -> int:
    if code not in (SUCCESS, IN_PROGRESS):
        detail = library().ncclGetErrorString(code)
        raise TransferError(f"{what} failed: {_RESULTS.get(code, code)} "
                            f"({detail.decode(errors='replace') if detail else code})")
    return code


class Communicator:
    """One non-blocking NCCL communicator; every wait on it is bounded and ends in an abort."""

    def __init__(self, unique_id: bytes, rank: int, world_size: int, timeout: float, blocking: bool = False):
        """`blocking`: (diagnosis, the nccl option of that name) a blocking communicator."""
        if len(unique_id) != UNIQUE_ID_BYTES:
            raise TransferError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, not {len(unique_id)}")
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self._comm = ctypes.c_void_p()
        self.aborted = False
        self.stats = {"in_progress": 0, "settle_seconds": 0.0}  # how often calls returned 'in progress'
        uid = UniqueId()
        ctypes.memmove(uid.internal, unique_id, UNIQUE_ID_BYTES)
        config = _Config(ctypes.sizeof(_Config), _CONFIG_MAGIC, _CONFIG_VERSION, 0,
                         _UNDEF_INT, _UNDEF_INT, _UNDEF_INT, None, _UNDEF_INT)
        lib = library()
        if blocking:  # diagnosis: a blocking communicator
            code = 4
        else:
            code = lib.ncclCommInitRankConfig(ctypes.byref(self._comm), world_size, uid, rank, ctypes.byref(config))
        if code == 4:  # this NCCL refuses the config layout: fall back to a blocking communicator
            self._comm = ctypes.c_void_p()
            code = lib.ncclCommInitRank(ctypes.byref(self._comm), world_size, uid, rank)
        if code not in (SUCCESS, IN_PROGRESS):
            self._comm = ctypes.c_void_p()
            _check(code, f"NCCL communicator setup (rank {rank} of {world_size})")
        self.settle(f"NCCL communicator setup (rank {rank} of {world_size})", time.monotonic() + timeout)

    @property
    def handle(self) -> ctypes.c_void_p:
        if self.aborted or not self._comm:
            raise TransferError("the NCCL communicator was aborted after a failure; init the group again")
        return self._comm

    def async_error(self) -> int:
        if self.aborted:
            raise TransferError("the NCCL communicator was aborted after a failure; init the group again")
        state = ctypes.c_int()
        _check(library().ncclCommGetAsyncError(self._comm, ctypes.byref(state)), "ncclCommGetAsyncError")
        return state.value

    def settle(self, what: str, deadline: float) -> None:
        """Wait until queued NCCL host work is done (non-blocking calls return 'in progress')."""
        began = time.monotonic()
        self.stats["in_progress"] += 1
        try:
            while True:
                state = self.async_error()
                if state == SUCCESS:
                    return
                if state != IN_PROGRESS:
                    self.abort()
                    _check(state, what)
                now = time.monotonic()
                if now > deadline:
                    self.abort()
                    raise TransferError(f"{what} timed out after {self.timeout:g}s (a peer is missing)")
                time.sleep(0 if now - began < 0.005 else 0.0002)  # usually over in microseconds
        finally:
            self.stats["settle_seconds"] += time.monotonic() - began

    def call(self, what: str, code: int) -> None:
        """Check a collective's return code; 'in progress' means NCCL still sets it up."""
        if code == IN_PROGRESS:
            self.settle(what, time.monotonic() + self.timeout)
        elif code != SUCCESS:
            self.abort()
            _check(code, what)

    def broadcast(self, ptr: int, nbytes: int, root: int, stream: int) -> None:
        self.call("ncclBroadcast", library().ncclBroadcast(ptr, ptr, nbytes, UINT8, root, self.handle, stream))

    def group_start(self) -> None:
        _check(library().ncclGroupStart(), "ncclGroupStart")

    def group_end(self) -> None:
        """Launch the calls made since `group_start` together (one kernel for all of them)."""
        self.call("ncclGroupEnd", library().ncclGroupEnd())

    def all_gather(self, send_ptr: int, recv_ptr: int, nbytes: int, stream: int) -> None:
        self.call("ncclAllGather", library().ncclAllGather(send_ptr, recv_ptr, nbytes, UINT8, self.handle, stream))

    def all_reduce_float(self, ptr: int, count: int, stream: int) -> None:
        self.call("ncclAllReduce", library().ncclAllReduce(ptr, ptr, count, FLOAT32, SUM, self.handle, stream))

    def abort(self) -> None:
        """Tear the communicator down locally, cancelling its queued and running kernels."""
        if self._comm and not self.aborted:
            self.aborted = True
            library().ncclCommAbort(self._comm)
