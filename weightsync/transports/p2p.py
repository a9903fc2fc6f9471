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

Everything else is ipc's protocol (`weightsync.transports.lending`): p2p adds its options, its
`PeerCopy` strategy, which the receiver composes, and a checksum of every byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Annotated, NamedTuple

import torch
from pydantic import Field

from weightsync.errors import ProtocolError
from weightsync.integrity import StreamDigest
from weightsync.landing import LoaderSink, StagedLoad, StagingPlan
from weightsync.layout import Layout
from weightsync.packing import Region, RegionPlan
from weightsync.protocol import InitInfo
from weightsync.transports.cuda_ipc import gpu_uuid, local_device_index
from weightsync.transports.lending.receiver import CopyStrategy, Landed, RoundPlan
from weightsync.transports.lending.transport import LendingTransport
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


class Piece(NamedTuple):
    """One copy-engine copy: `src`, a slice of the trainer's memory, into `dst`."""

    dst: torch.Tensor
    src: torch.Tensor


@dataclass(frozen=True)
class PieceGroup:
    """Pieces copied on one stream and checksummed together once they all landed."""

    members: list[int]  # indexes into the plan's pieces
    checksum: RegionPlan | None  # of what landed; None when the round is not fully checksummed


@dataclass(frozen=True)
class PeerCopyPlan:
    """A round's pull: copy-engine pieces in checksummed groups, and the small tensors' kernel."""

    pieces: list[Piece]
    groups: list[PieceGroup]
    small: RegionPlan | None = None  # tensors under SMALL_BYTES: one batched copy-and-checksum kernel


@dataclass(frozen=True)
class StagedPull:
    """A loader round's plan: the local staging it was built for, the staged load, and each
    chunk's copies from the trainer's memory into that staging."""

    area: torch.Tensor
    staged: StagedLoad
    pieces: list[list[Piece]]


class PeerCopy(CopyStrategy[PeerCopyPlan]):
    """p2p's way to move bytes: the trainer's memory is on a peer GPU, so the copy engines pull
    it over NVLink in groups on alternating copy streams, each group checksummed on this GPU as
    soon as it landed; a loader gets the bytes through bounded local staging (reading the peer
    once), never views of the peer's memory."""

    def __init__(self, device: torch.device, side: torch.cuda.Stream, options: P2pOptions) -> None:
        self._device = device
        self._check = side  # the checksums run here
        self._options = options
        self._copies: list[torch.cuda.Stream] = []
        self._area: torch.Tensor | None = None  # a loader round's staging

    def choose_gpu(self, uuids: list[str]) -> str:
        """The trainer GPU to pull from: one this process can see (prefer its own, then the
        first visible peer)."""
        own = gpu_uuid(self._device.index)
        if own in uuids:
            return own
        for uuid in uuids:
            if local_device_index(uuid) is not None:
                return uuid
        raise ProtocolError("update_info.ipc_handles",
                            f"none of the trainer's GPUs {uuids} is visible to this process; "
                            "p2p needs the trainer's GPU visible here (same pod or a node-level daemon)")

    def copy_plan(self, plan: RoundPlan, checksum: bool) -> PeerCopyPlan:
        """Copy-engine pieces, grouped, each group with its checksum of what landed; tensors
        under SMALL_BYTES go in one batched kernel instead (a copy engine's fixed cost per copy
        would exceed their transfer time)."""
        large = [(s, d, o) for s, d, o in zip(plan.sources, plan.destinations, plan.offsets, strict=True)
                 if s.numel() >= SMALL_BYTES]
        small = [Region(s, d, o) for s, d, o in zip(plan.sources, plan.destinations, plan.offsets, strict=True)
                 if 0 < s.numel() < SMALL_BYTES]
        pulled = (piece_plan([s for s, _, _ in large], [d for _, d, _ in large], [o for _, _, o in large], checksum,
                             self._options.piece_bytes) if large else PeerCopyPlan([], []))
        return replace(pulled, small=RegionPlan(small, copy=True, digest=checksum) if small else None)

    def pull(self, copy_plan: PeerCopyPlan, digest: StreamDigest | None) -> torch.cuda.Event:
        current = torch.cuda.current_stream(self._device)
        copy_streams = self._copy_streams()
        for stream in copy_streams:
            stream.wait_stream(current)
        check = self._check
        check.wait_stream(current)
        if copy_plan.small is not None:
            with torch.cuda.stream(check):
                copy_plan.small.run(digest)
        pieces = copy_plan.pieces
        for number, group in enumerate(copy_plan.groups):
            stream = copy_streams[number % len(copy_streams)]
            with torch.cuda.stream(stream):
                for index in group.members:
                    dst, src = pieces[index]
                    dst.copy_(src, non_blocking=True)
                landed = torch.cuda.Event()
                landed.record(stream)
            check.wait_event(landed)
            if group.checksum is not None and digest is not None:
                with torch.cuda.stream(check):
                    group.checksum.run(digest)
        done = torch.cuda.Event()
        done.record(check)
        return done

    def load(self, plan: RoundPlan, loader: LoaderSink, digest: StreamDigest | None, full: bool,
             init: InitInfo) -> Landed:
        """The bytes cross NVLink once, with the copy engines, into bounded local staging
        (`landing.StagingPlan`, packed_num_buffers x packed_buffer_size_bytes), where each chunk is
        checksummed and its completed groups handed to the loader while the next chunks are still
        being pulled. (Handing the loader views of the peer's memory would read every byte over
        NVLink twice: once by the loader's copies, once by the checksum.) The host never waits
        here: each step is ordered behind the last on the GPU, and the caller waits, bounded, for
        the returned event."""
        pull = self._staged_pull(plan, loader, full and digest is not None, init)
        current = torch.cuda.current_stream(self._device)
        copies = self._copy_streams()

        def post(number: int) -> torch.cuda.Event:
            stream = copies[number % len(copies)]
            stream.wait_stream(current)  # the staging bytes it overwrites were checksummed and loaded
            with torch.cuda.stream(stream):
                for dst, src in pull.pieces[number]:
                    dst.copy_(src, non_blocking=True)
            landed = torch.cuda.Event()
            landed.record(stream)
            return landed

        failure = pull.staged.run(post, current.wait_event, loader, digest if full else None, init.packed_num_buffers)
        done = torch.cuda.Event()
        done.record(current)
        return Landed(failure, done, full)

    def _staged_pull(self, plan: RoundPlan, loader: LoaderSink, verify: bool, init: InitInfo) -> StagedPull:
        """The round's staged load and each chunk's (staging, peer) copies, built once per plan."""
        cached = plan.loads.get(verify)
        if isinstance(cached, StagedPull) and cached.area is self._area:
            return cached
        manifest = plan.landing.manifest
        assert manifest is not None  # a loader round's landing names its manifest
        layout = Layout.of_sizes(plan.sizes)
        capacity = init.packed_num_buffers * init.packed_buffer_size_bytes
        # The receiver cuts the round itself: chunks of a quarter of the staging at most, so that
        # a fused group and the chunks in flight around it fit (1 GiB x 2: 512 MiB chunks); each
        # piece is its own copy, so each tensor has its own place (a piecewise plan).
        size = max(min(init.packed_buffer_size_bytes, capacity // 4) // 256 * 256, 256)
        chunks = layout.chunks(size, ramp=True)
        staging = StagingPlan.build(layout, chunks, capacity, manifest.names, loader.run_ends(manifest),
                                    piecewise=True)
        if self._area is None or self._area.numel() != capacity:
            self._area = None  # free the old one before allocating
            self._area = torch.empty(capacity, dtype=torch.uint8, device=self._device)
        loader.staging_bytes = self._area.numel()
        staged = StagedLoad(staging, self._area, manifest, chunks, layout, verify)
        pieces = [[Piece(dst, plan.sources[s.index][s.start : s.stop])
                   for dst, s in zip(staged.pieces[c.number], [s for s in c.segments if s.nbytes], strict=True)]
                  for c in chunks]
        pull = plan.loads[verify] = StagedPull(self._area, staged, pieces)
        return pull

    def _copy_streams(self) -> list[torch.cuda.Stream]:
        if not self._copies:
            self._copies = [torch.cuda.Stream(self._device) for _ in range(self._options.copy_streams)]
        return self._copies

    def close(self) -> None:
        self._area = None


class P2pTransport(LendingTransport):
    """p2p: trainer and receiver on different GPUs of the host (see the module docstring)."""

    name = "p2p"
    options_model = P2pOptions
    # coverage(): LendingTransport's, every byte (the copy crosses NVLink)

    def copy_strategy(self, side: torch.cuda.Stream) -> CopyStrategy[PeerCopyPlan]:
        options = self.options
        assert isinstance(options, P2pOptions)  # options_model
        return PeerCopy(self.device, side, options)


def group_target(remaining: int, piece_bytes: int | None = None) -> int:
    """Bytes for the next group when `remaining` bytes are left: `piece_bytes` (default
    PIECE_BYTES), halving towards the end of the round (never under TAIL_BYTES)."""
    return min(PIECE_BYTES if piece_bytes is None else piece_bytes, max(TAIL_BYTES, remaining // 2))


def piece_plan(sources: Sequence[torch.Tensor], destinations: Sequence[torch.Tensor], offsets: Sequence[int],
               verify: bool, piece_bytes: int | None = None) -> PeerCopyPlan:
    """Cut the (source, destination) pairs, in stream order, into pieces that fill groups of
    `group_target` bytes; each group gets its checksum plan when `verify`."""
    pieces: list[Piece] = []
    groups: list[PieceGroup] = []
    members: list[int] = []
    group_regions: list[Region] = []
    remaining = sum(src.numel() for src in sources)
    room = group_target(remaining, piece_bytes)

    def close_group() -> None:
        nonlocal members, group_regions, room
        if members:
            groups.append(PieceGroup(members, RegionPlan(group_regions, copy=False) if verify else None))
        members, group_regions, room = [], [], group_target(remaining, piece_bytes)

    for src, dst, offset in zip(sources, destinations, offsets, strict=True):
        start = 0
        while start < src.numel():
            stop = min(start + room, src.numel())
            pieces.append(Piece(dst[start:stop], src[start:stop]))
            members.append(len(pieces) - 1)
            group_regions.append(Region(dst[start:stop], None, offset + start))
            room -= stop - start
            remaining -= stop - start
            start = stop
            if room <= 0:
                close_group()
    close_group()
    return PeerCopyPlan(pieces, groups)
