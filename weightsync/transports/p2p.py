"""The p2p transport: trainer and receiver on different GPUs of the same host.

The single-node RL layout (trainer on some GPUs, inference on the others) needs no network at
all: the receiver opens the trainer's IPC handles (exactly as the ipc transport does, same JSON)
into its own GPU's context, and pulls the bytes over NVLink with the GPU copy engines
(`cudaMemcpyAsync` between peers, through `tensor.copy_`), so no SMs are taken from inference
for the transfer. A peer copy also moves more bytes per second than an NCCL broadcast between
the same two GPUs.

Copies go in pieces of at most PIECE_BYTES, round-robin over COPY_STREAMS copy streams (several
copy engines work at once; tensors under SMALL_BYTES go in one batched kernel instead); each group of pieces is checksummed on the receiver's GPU
as soon as it landed, while later pieces are still in flight, so verifying adds only the last
group's checksum to the round.

In Kubernetes the receiving process must see both GPUs (the same pod, or a node-level daemon).
"""

from __future__ import annotations

import torch

from weightsync.errors import ProtocolError
from weightsync.integrity import StreamDigest
from weightsync.packing import Region, RegionPlan
from weightsync.transports import register
from weightsync.transports.cuda_ipc import gpu_uuid, local_device_index
from weightsync.transports.ipc import IpcTransport

PIECE_BYTES = 256 << 20
SMALL_BYTES = 4 << 20
COPY_STREAMS = 4  # copies in flight at once, on as many copy engines


@register
class P2pTransport(IpcTransport):
    name = "p2p"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._copies: list[torch.cuda.Stream] = []

    def _choose_gpu(self, uuids: list[str]) -> str:
        """The trainer GPU to pull from: one this process can see (prefer its own, then the
        first visible peer)."""
        own = gpu_uuid(self.device.index)
        if own in uuids:
            return own
        for uuid in uuids:
            if local_device_index(uuid) is not None:
                return uuid
        raise ProtocolError("update_info.ipc_handles",
                            f"none of the trainer's GPUs {uuids} is visible to this process; "
                            "p2p needs the trainer's GPU visible here (same pod or a node-level daemon)")

    def _plan(self, prepared, verify: bool):
        """p2p: copy-engine pieces, grouped, each group with its checksum of what landed; tensors
        under SMALL_BYTES go in one batched kernel instead (a copy engine's fixed cost per copy
        would exceed their transfer time)."""
        large = [(s, d, o) for s, d, o in zip(prepared.sources, prepared.destinations, prepared.offsets)
                 if s.numel() >= SMALL_BYTES]
        small = [Region(s, d, o) for s, d, o in zip(prepared.sources, prepared.destinations, prepared.offsets)
                 if 0 < s.numel() < SMALL_BYTES]
        pieces, groups = _piece_plan(*zip(*large), verify) if large else ([], [])
        return pieces, groups, RegionPlan(small, copy=True, digest=verify) if small else None

    def _pull(self, plan, digest: StreamDigest | None) -> torch.cuda.Event:
        pieces, groups, small = plan
        current = torch.cuda.current_stream(self.device)
        copy_streams = self._copy_streams()
        for stream in copy_streams:
            stream.wait_stream(current)
        check = self._side
        check.wait_stream(current)
        if small is not None:
            with torch.cuda.stream(check):
                small.run(digest)
        for number, (members, checksum) in enumerate(groups):
            stream = copy_streams[number % len(copy_streams)]
            with torch.cuda.stream(stream):
                for index in members:
                    dst, src = pieces[index]
                    dst.copy_(src, non_blocking=True)
                landed = torch.cuda.Event()
                landed.record(stream)
            check.wait_event(landed)
            if checksum is not None and digest is not None:
                with torch.cuda.stream(check):
                    checksum.run(digest)
        done = torch.cuda.Event()
        done.record(check)
        return done

    def _copy_streams(self) -> list[torch.cuda.Stream]:
        if not self._copies:
            self._copies = [torch.cuda.Stream(self.device) for _ in range(COPY_STREAMS)]
        return self._copies


def _piece_plan(sources, destinations, offsets, verify: bool):
    """Cut every (source, destination) pair into pieces of at most PIECE_BYTES and group
    consecutive pieces into about PIECE_BYTES per group, each with its checksum plan."""
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
    groups = []
    members: list[int] = []
    group_regions: list[Region] = []
    filled = 0

    def close_group():
        nonlocal members, group_regions, filled
        if members:
            plan = RegionPlan(group_regions, copy=False) if verify else None
            groups.append((members, plan))
        members, group_regions, filled = [], [], 0

    for src, dst, offset in zip(sources, destinations, offsets):
        for start in range(0, max(src.numel(), 1), PIECE_BYTES):
            stop = min(start + PIECE_BYTES, src.numel())
            if stop <= start:
                continue
            pieces.append((dst[start:stop], src[start:stop]))
            members.append(len(pieces) - 1)
            group_regions.append(Region(dst[start:stop], None, offset + start))
            filled += stop - start
            if filled >= PIECE_BYTES:
                close_group()
    close_group()
    return pieces, groups
