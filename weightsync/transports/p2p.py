"""The p2p transport: trainer and receiver on different GPUs of the same host.

The single-node RL layout (trainer on some GPUs, inference on the others) needs no network at
all: the receiver opens the trainer's IPC handles (exactly as the ipc transport does, same JSON)
into its own GPU's context, and pulls the bytes over NVLink with the GPU copy engines
(`cudaMemcpyAsync` between peers, through `tensor.copy_`), so no SMs are taken from inference
for the transfer. A peer copy also moves more bytes per second than an NCCL broadcast between
the same two GPUs.

Copies go in groups of at most `piece_bytes`, alternating over `copy_streams` copy streams (so one
copy's launch gap is covered by the other's transfer; tensors under SMALL_BYTES go in one batched
kernel instead). Each group is checksummed on the receiver's GPU as soon as it landed, while later
groups are still in flight; the groups halve in size towards the end of the round (down to
TAIL_BYTES), so verifying adds only a small last group's checksum. The trainer checksums what it
lends with few GPU programs (`source_sum_programs`), leaving its memory bandwidth to the copy
engines that read it. The three are init_info.options (`P2pOptions`), agreed by every party.

In Kubernetes the receiving process must see both GPUs (the same pod, or a node-level daemon).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from weightsync.errors import ProtocolError
from weightsync.integrity import StreamDigest
from weightsync.landing import LoaderSink, StagedLoad, StagingPlan
from weightsync.layout import Layout
from weightsync.packing import Region, RegionPlan
from weightsync.transports import register
from weightsync.transports.cuda_ipc import gpu_uuid, local_device_index
from weightsync.transports.ipc import IpcTransport
from weightsync.transports.options import TransportOptions

PIECE_BYTES = 1 << 30  # default of P2pOptions.piece_bytes; 2 x H200: 1 GiB copies match
TAIL_BYTES = 128 << 20  # one flat copy; 256 MiB lose 1%
SMALL_BYTES = 4 << 20


class P2pOptions(TransportOptions):
    """The p2p transport's init_info.options (every byte is always checksummed: it crosses
    NVLink); every party must join with the same values."""

    # GPU programs of the trainer's checksum of what it lends. A full-grid checksum on the
    # trainer's GPU slowed the pull by 10%: the copy engines read there. On 2 x H200 (15 GB):
    # 32 programs 1.059x a peer copy, 16 1.053x, 8 1.050x.
    source_sum_programs: Annotated[int, Field(ge=1, le=65536)] = 8
    # The largest group of peer copies checksummed together (groups halve towards the end).
    piece_bytes: Annotated[int, Field(ge=TAIL_BYTES, le=1 << 40)] = PIECE_BYTES
    # Copy streams the receiver alternates over (copies in flight at once).
    copy_streams: Annotated[int, Field(ge=1, le=16)] = 2


@register
class P2pTransport(IpcTransport):
    name = "p2p"
    options_model = P2pOptions
    sampled_checksum = False  # the bytes cross NVLink: every one is checked

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._copies: list[torch.cuda.Stream] = []
        self._area: torch.Tensor | None = None  # a loader round's staging

    def close(self) -> None:
        self._area = None
        super().close()

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
        pieces, groups = _piece_plan(*zip(*large), verify, self.options.piece_bytes) if large else ([], [])
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

    def _load_lent(self, prepared, loader: LoaderSink, digest: StreamDigest | None, full: bool):
        """p2p: the bytes cross NVLink once, with the copy engines, into bounded local staging
        (`landing.StagingPlan`, packed_num_buffers x packed_buffer_size_bytes), where each chunk is
        checksummed and its completed groups handed to the loader while the next chunks are still
        being pulled. (Handing the loader views of the peer's memory would read every byte over
        NVLink twice: once by the loader's copies, once by the checksum.) The host never waits
        here: each step is ordered behind the last on the GPU, and the caller waits, bounded, for
        the returned event."""
        staged, pieces = self._staged_plan(prepared, loader, full and digest is not None)
        current = torch.cuda.current_stream(self.device)
        copies = self._copy_streams()

        def post(number: int) -> torch.cuda.Event:
            stream = copies[number % len(copies)]
            stream.wait_stream(current)  # the staging bytes it overwrites were checksummed and loaded
            with torch.cuda.stream(stream):
                for dst, src in pieces[number]:
                    dst.copy_(src, non_blocking=True)
            landed = torch.cuda.Event()
            landed.record(stream)
            return landed

        failure = staged.run(post, current.wait_event, loader, digest if full else None,
                             self.init.packed_num_buffers)
        done = torch.cuda.Event()
        done.record(current)
        return failure, done, full

    def _staged_plan(self, prepared, loader: LoaderSink, verify: bool):
        """The round's staged load and each chunk's (staging, peer) copies, built once per plan."""
        cached = prepared.plans.get(("staged", verify))
        if cached is not None and cached[0] is self._area:
            return cached[1], cached[2]
        manifest = prepared.landing.manifest
        layout = Layout.of_sizes(prepared.sizes)
        capacity = self.init.packed_num_buffers * self.init.packed_buffer_size_bytes
        # The receiver cuts the round itself: chunks of a quarter of the staging at most, so that
        # a fused group and the chunks in flight around it fit (1 GiB x 2: 512 MiB chunks); each
        # piece is its own copy, so each tensor has its own place (a piecewise plan).
        size = max(min(self.init.packed_buffer_size_bytes, capacity // 4) // 256 * 256, 256)
        chunks = layout.chunks(size, ramp=True)
        plan = StagingPlan.build(layout, chunks, capacity, manifest.names, loader.run_ends(manifest), piecewise=True)
        if self._area is None or self._area.numel() != capacity:
            self._area = None  # free the old one before allocating
            self._area = torch.empty(capacity, dtype=torch.uint8, device=self.device)
        loader.staging_bytes = self._area.numel()
        staged = StagedLoad(plan, self._area, manifest, chunks, layout, verify)
        pieces = [[(dst, prepared.sources[s.index][s.start : s.stop])
                   for dst, s in zip(staged.pieces[c.number], [s for s in c.segments if s.nbytes])] for c in chunks]
        prepared.plans[("staged", verify)] = (self._area, staged, pieces, chunks)
        return staged, pieces

    def _copy_streams(self) -> list[torch.cuda.Stream]:
        if not self._copies:
            self._copies = [torch.cuda.Stream(self.device) for _ in range(self.options.copy_streams)]
        return self._copies


def group_target(remaining: int, piece_bytes: int | None = None) -> int:
    """Bytes for the next group when `remaining` bytes are left: `piece_bytes` (default
    PIECE_BYTES), halving towards the end of the round (never under TAIL_BYTES)."""
    return min(PIECE_BYTES if piece_bytes is None else piece_bytes, max(TAIL_BYTES, remaining // 2))


def _piece_plan(sources, destinations, offsets, verify: bool, piece_bytes: int | None = None):
    """Cut the (source, destination) pairs, in stream order, into pieces that fill groups of
    `group_target` bytes; each group gets its checksum plan."""
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
    groups = []
    members: list[int] = []
    group_regions: list[Region] = []
    remaining = sum(src.numel() for src in sources)
    room = group_target(remaining, piece_bytes)

    def close_group():
        nonlocal members, group_regions, room
        if members:
            groups.append((members, RegionPlan(group_regions, copy=False) if verify else None))
        members, group_regions, room = [], [], group_target(remaining, piece_bytes)

    for src, dst, offset in zip(sources, destinations, offsets):
        start = 0
        while start < src.numel():
            stop = min(start + room, src.numel())
            pieces.append((dst[start:stop], src[start:stop]))
            members.append(len(pieces) - 1)
            group_regions.append(Region(dst[start:stop], None, offset + start))
            room -= stop - start
            remaining -= stop - start
            start = stop
            if room <= 0:
                close_group()
    close_group()
    return pieces, groups
