"""The ipc transport: trainer and receiver on the same GPU, in separate processes.

The trainer lends its memory instead of sending it. Its `/update_weights` answer carries
`update_info` with CUDA IPC handles (validated JSON, see `cuda_ipc.py`) for the storages that hold
the round's tensors; the coordinator hands that to every receiver's `/update_weights`, and each
receiver copies the bytes into its weights with one batched kernel that also folds them into the
round checksum. The trainer keeps every lent tensor alive until the round ends.

- Zero copies on the trainer: contiguous tensors on the trainer's GPU are lent as they are.
  Anything else (a non-contiguous view, a tensor on another device) is first copied into a
  staging area of at most `packed_num_buffers` x `packed_buffer_size_bytes`, shared once; when
  it fills up, the round continues in further batches (`more` in the answer), so the trainer's
  extra memory stays bounded whatever it sends.
- Opened once: the trainer exports each storage once and reuses the record while the storage
  lives; a receiver keeps what it opened and reuses it while the records stay the same, so a
  repeat round is just the copy.
- Verified: with `verify`, the trainer checksums what it lends on a side stream and publishes
  the value on the group's rendezvous store; each receiver compares it with the checksum of the
  bytes it copied before it commits anything that is not already live. On one GPU the trainer
  checksums a sample (`integrity.sample_ranges`: every tensor's ends and one 64 KiB window per
  4 MiB, about 2% of a large set) and the receiver checksums the same ranges of what it wrote: a
  full checksum would read the whole set again from the memory the copy itself uses (on an
  H200 a repeat round took 1.25-1.45x a plain copy that way, 1.12-1.15x with the sample). The sample
  catches what goes wrong on one GPU: bytes read from the wrong memory, a tensor rewritten
  during the round, a stale mapping.
  The option `verify: full` (init_info.options, agreed by every party; default
  $WEIGHTSYNC_IPC_VERIFY, else sample) checksums every byte; p2p always does (its copy crosses NVLink).

The rendezvous store (the trainer's TCPStore at master_address:master_port) is the only other
channel: no NCCL, no collective; each receiver checks the manifest against its own weights.

The protocol's parts live in `weightsync.transports.lending` (shared with p2p): this module adds
only ipc's options, its `LocalCopy` strategy and its `Coverage` choice.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from weightsync.errors import ProtocolError
from weightsync.integrity import StreamDigest
from weightsync.landing import LoaderSink
from weightsync.packing import Region, RegionPlan
from weightsync.protocol import InitInfo
from weightsync.transports.cuda_ipc import gpu_uuid
from weightsync.transports.lending.checksums import Coverage
from weightsync.transports.lending.receiver import CopyStrategy, Landed, RoundPlan
from weightsync.transports.lending.transport import LendingTransport
from weightsync.transports.options import TransportOptions, env_default


def _verify_mode(raw: str) -> Literal["sample", "full"]:
    value = raw.strip().lower()
    if value == "sample":
        return "sample"
    if value == "full":
        return "full"
    raise ValueError("expected sample or full")


class IpcOptions(TransportOptions):
    """The ipc transport's init_info.options; every party must join with the same values."""

    # With init_info.verify, what the checksum covers: "sample", every tensor's ends and one
    # 64 KiB window per 4 MiB (about 2% of a large set; see the module docstring), or "full",
    # every byte. Default: $WEIGHTSYNC_IPC_VERIFY, else sample.
    verify: Literal["sample", "full"] = Field(
        default_factory=env_default("WEIGHTSYNC_IPC_VERIFY", _verify_mode, "sample"))
    # GPU programs of the trainer's checksum; None: all it takes.
    source_sum_programs: Annotated[int, Field(ge=1, le=65536)] | None = None


class LocalCopy(CopyStrategy[RegionPlan]):
    """ipc's way to move bytes: the trainer's memory is on this receiver's own GPU, so one
    batched kernel copies every tensor (and checksums what it read) on the side stream, and a
    loader is handed views of the trainer's memory itself."""

    def __init__(self, device: torch.device, side: torch.cuda.Stream) -> None:
        self._device = device
        self._side = side

    def choose_gpu(self, uuids: list[str]) -> str:
        """The handles of the GPU this receiver sits on."""
        own = gpu_uuid(self._device.index)
        if own not in uuids:
            raise ProtocolError("update_info.ipc_handles",
                                f"no handles for this GPU ({own}); the trainer lent {uuids}. "
                                "A receiver on another GPU of the host uses the p2p transport")
        return own

    def copy_plan(self, plan: RoundPlan, checksum: bool) -> RegionPlan:
        return RegionPlan([Region(s, d, off)
                           for s, d, off in zip(plan.sources, plan.destinations, plan.offsets, strict=True)],
                          copy=True, digest=checksum)

    def pull(self, copy_plan: RegionPlan, digest: StreamDigest | None) -> torch.cuda.Event:
        stream = self._side
        stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(stream):
            copy_plan.run(digest)
            done = torch.cuda.Event()
            done.record(stream)
        return done

    def load(self, plan: RoundPlan, loader: LoaderSink, digest: StreamDigest | None, full: bool,
             init: InitInfo) -> Landed:
        """Hand the loader views of the trainer's memory, all at once (every byte is in); with a
        full checksum, checksum them behind the loader's copies."""
        failure = None
        try:
            loader.hand(plan.views)
        except Exception as error:  # noqa: BLE001 - the engine's loader
            failure = f"the loader failed: {error!r}"
        if full and digest is not None:
            if True not in plan.loads:
                plan.loads[True] = Coverage.FULL.plan(plan.sources, plan.offsets)
            checksum = plan.loads[True]
            assert isinstance(checksum, RegionPlan)  # this strategy's own cache entry
            checksum.run(digest)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self._device))
        return Landed(failure, done, full)


class IpcTransport(LendingTransport):
    """ipc: trainer and receiver on the same GPU (see the module docstring)."""

    name = "ipc"
    options_model = IpcOptions

    def coverage(self) -> Coverage:
        """The agreed `verify` option: a sample (the default) or every byte."""
        options = self.options
        assert isinstance(options, IpcOptions)  # options_model
        return Coverage(options.verify)

    def copy_strategy(self, side: torch.cuda.Stream) -> CopyStrategy[RegionPlan]:
        return LocalCopy(self.device, side)
