"""The receiver side of a lent round: open the trainer's handles, land the bytes, verify."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from weightsync.errors import IntegrityError, ManifestMismatch, ProtocolError, TransferError
from weightsync.integrity import DIGEST_BYTES, StreamDigest, format_digest
from weightsync.landing import (
    Landing, LoaderSink, Shadow, Sink, check_indices, choose_landing, shaped_views, sink_verdict, stream_sizes,
)
from weightsync.layout import Layout
from weightsync.packing import RegionPlan
from weightsync.protocol import InitInfo, Manifest, UpdateInfo
from weightsync.store import WeightStore
from weightsync.transports.base import RoundStats
from weightsync.transports.cuda_ipc import GpuHandles, open_storage
from weightsync.transports.lending.checksums import Coverage, DigestBoard
from weightsync.transports.lending.header import HandleReader, ManifestReader
from weightsync.transports.waits import wait_event_until


@dataclass(frozen=True)
class PlanKey:
    """What a receiver's plan was made for; a dense round with the same key reuses it."""

    handles_version: int  # HandleReader.version
    manifest_version: int  # ManifestReader.version
    kind: str
    sink: int  # id() of the sink
    sink_tensors: int  # a WeightStore's len() (0 for a loader)
    atomic: bool


@dataclass
class RoundPlan:
    """A receiver's plan for a round: validated once, reused while handles, manifest and sink
    stay. The caches at the end belong to whoever fills them: `copies` and `loads` to the
    receiver's `CopyStrategy`, `sample` to the receiver's verification."""

    key: PlanKey
    sizes: list[int]
    sources: list[torch.Tensor]  # flat views of the trainer's bytes, one per stream tensor
    destinations: list[torch.Tensor]
    offsets: tuple[int, ...]
    landing: Landing
    views: list[tuple[str, torch.Tensor]]  # a loader round: (name, shaped view of the trainer's bytes)
    copies: dict[bool, object] = field(default_factory=dict)  # strategy's copy plan, by full checksum
    loads: dict[bool, object] = field(default_factory=dict)  # strategy's loader plan, by full checksum
    sample: RegionPlan | None = None  # the sampled checksum of what was written (or handed over)


@dataclass(frozen=True)
class Landed:
    """What a strategy's load into a loader left: the loader's failure (None: it took every
    tensor), the event that marks the end on the GPU, and whether the checksum is complete."""

    failure: str | None
    done: torch.cuda.Event
    covered: bool


CopyPlanT = TypeVar("CopyPlanT")


class CopyStrategy(ABC, Generic[CopyPlanT]):
    """How a receiver moves the trainer's bytes: which trainer GPU it reads from, the copy into
    the weights (with its checksum), and the hand-over to an engine's loader. The receiver owns
    the round (plan, verification, commit); a strategy only moves bytes, on its own streams.
    `CopyPlanT`: the strategy's own copy plan (ipc's RegionPlan, p2p's PeerCopyPlan)."""

    @abstractmethod
    def choose_gpu(self, uuids: list[str]) -> str:
        """The UUID of the trainer GPU (one of `uuids`) whose handles this receiver opens."""

    @abstractmethod
    def copy_plan(self, plan: RoundPlan, checksum: bool) -> CopyPlanT:
        """The copy of `plan`'s sources into its destinations (checksumming what it reads when
        `checksum`); built once per plan, cached in `plan.copies`."""

    @abstractmethod
    def pull(self, copy_plan: CopyPlanT, digest: StreamDigest | None) -> torch.cuda.Event:
        """Run a `copy_plan`, behind the current stream; the event marks its end."""

    @abstractmethod
    def load(self, plan: RoundPlan, loader: LoaderSink, digest: StreamDigest | None, full: bool,
             init: InitInfo) -> Landed:
        """Hand the trainer's bytes to `loader` (with a full checksum into `digest` when `full`)."""

    def close(self) -> None:  # noqa: B027 (an optional hook: the default does nothing)
        """Free what the strategy holds."""


class OpenedStorages:
    """The trainer's storages this receiver mapped: each opened once, kept while the trainer
    lends it, released when a round no longer names it."""

    def __init__(self) -> None:
        self._opened: dict[tuple[str, int, int], torch.Tensor] = {}

    def sources(self, handles: GpuHandles) -> list[torch.Tensor]:
        """Flat views of the trainer's bytes, one per stream tensor."""
        used = {}
        flats = []
        for storage in handles.storages:
            key = (storage.handle, storage.offset_bytes, storage.size_bytes)
            flat = self._opened.get(key)
            if flat is None:
                try:
                    flat = open_storage(storage, handles.device)
                except Exception as error:  # noqa: BLE001 - CUDA reports a bad or foreign handle
                    raise TransferError(f"cannot open the trainer's IPC handle: {error}") from error
            used[key] = flat
            flats.append(flat)
        self._opened = used  # storages the trainer stopped lending are released here
        return [flats[p.storage][p.offset : p.offset + p.nbytes] for p in handles.tensors]

    def clear(self) -> None:
        self._opened.clear()


class IpcReceiver:
    """Receiver side of an ipc or p2p group: take one round of the trainer's lent bytes into a
    sink (a `WeightStore` or a `LoaderSink`, see `weightsync.landing`).

    Everything is checked before the first byte moves (handles against the manifest, manifest
    against the sink); the bytes then move with the `CopyStrategy`, the checksum of what was
    written (all of it, or the trainer's `Coverage.SAMPLE`) is compared with the trainer's
    value on the `DigestBoard`, and only then is anything committed."""

    def __init__(self, transport: str, init: InitInfo, device: torch.device, board: DigestBoard,
                 side: torch.cuda.Stream, copier: CopyStrategy[Any]):
        self.init = init
        self.device = device
        self._timeout = init.timeout_seconds
        self._board = board
        self._side = side  # checksums (and ipc's copy) run here
        self._copier = copier
        self._handles = HandleReader(transport, device)
        self._manifests = ManifestReader(transport)
        self._storages = OpenedStorages()
        self._plan: RoundPlan | None = None
        self._shadow = Shadow()
        self._digest_host = torch.empty(DIGEST_BYTES, dtype=torch.uint8, pin_memory=True)

    def receive(self, sink: Sink, info: UpdateInfo) -> RoundStats:
        """Copy (or hand to the loader) the trainer's lent bytes, verify them, then commit."""
        started = time.perf_counter()
        handles = self._handles.read(info.ipc_handles, self._copier.choose_gpu)
        manifest = self._manifests.read(info)
        kind = info.update_kind or "dense"
        loader = sink if isinstance(sink, LoaderSink) else None
        if loader is not None:
            loader.begin_round()
        key = PlanKey(self._handles.version, self._manifests.version, kind, id(sink),
                      len(sink) if isinstance(sink, WeightStore) else 0, self.init.atomic)
        plan = self._plan_for(key, handles, manifest, kind, sink)
        landing = plan.landing
        digest = StreamDigest(self.device) if handles.verify else None
        try:
            checksum = self._land(plan, handles, loader, digest)
            if landing.scratch is not None:
                problem = check_indices(manifest, landing.scratch, sink)
                if problem:
                    raise TransferError(f"round not applied: {problem}")
        except TransferError as error:
            error.weights_touched = landing.touched()
            raise
        landing.commit(sink)
        if kind != "dense" or self.init.atomic or loader is not None:
            torch.cuda.current_stream(self.device).synchronize()
        return RoundStats(handles.round_id, kind, len(manifest.tensors), sum(plan.sizes), 0,
                          time.perf_counter() - started, in_place=landing.writes_live and loader is None,
                          checksum=checksum)

    def _plan_for(self, key: PlanKey, handles: GpuHandles, manifest: Manifest, kind: str, sink: Sink) -> RoundPlan:
        """The last plan while its key holds (dense rounds only: a sparse round's indices change
        every round); else a new one, checked before anything moves."""
        plan = self._plan
        if plan is None or plan.key != key or kind != "dense":
            self._plan = None  # release what the last plan held first
            plan = self._prepare(key, handles, manifest, kind, sink)
            if kind == "dense":
                self._plan = plan
        return plan

    def _land(self, plan: RoundPlan, handles: GpuHandles, loader: LoaderSink | None,
              digest: StreamDigest | None) -> str | None:
        """Move the trainer's bytes and wait for them; with a `digest`, check what landed against
        the trainer's value and return its checksum. TransferError when the loader failed, the
        copy did not end in time or the trainer's value did not come; IntegrityError when the
        checksums differ."""
        verify, sampled = handles.verify, handles.verify and handles.sampled
        full = verify and not sampled  # the copy checksums everything it reads
        landed = self._move(plan, loader, digest, full)
        sent = self._checksum_behind(plan, landed, digest, handles.round_id) if digest is not None else None
        wait_event_until(landed.done, time.monotonic() + self._timeout, "copying from the trainer")
        if landed.failure is not None:
            raise TransferError(f"round not applied: {landed.failure}")
        if isinstance(sent, TransferError):
            raise sent
        if digest is None:
            return None
        checksum = format_digest(self._digest_host.numpy().tobytes())
        if sent != checksum:
            raise IntegrityError(f"round not applied: checksum mismatch: received {checksum}, "
                                 f"trainer sent {sent}")
        return checksum

    def _move(self, plan: RoundPlan, loader: LoaderSink | None, digest: StreamDigest | None, full: bool) -> Landed:
        """Start moving the bytes with the strategy: handed to the loader (a staged landing) or
        copied into the destinations, checksummed as they are read when `full`."""
        if plan.landing.staged:
            assert loader is not None  # only a loader round stages
            return self._copier.load(plan, loader, digest, full, self.init)
        if full not in plan.copies:
            plan.copies[full] = self._copier.copy_plan(plan, full)
        done = self._copier.pull(plan.copies[full], digest if full else None)
        return Landed(None, done, full)

    def _checksum_behind(self, plan: RoundPlan, landed: Landed, digest: StreamDigest,
                         round_id: str) -> str | TransferError:
        """While the copy runs: the trainer's value (its store round trip off the critical path;
        an error is returned, raised once the copy is over: the copy reads the trainer's memory).
        Behind the copy (on the stream `landed.done` is recorded on): the sample's checksum of
        what was written (or handed over) when the copy's did not cover it all, and the copy of
        ours to host memory."""
        sent: str | TransferError
        try:
            sent = self._board.fetch(round_id)
        except TransferError as error:
            sent = error
        with torch.cuda.stream(self._side):
            self._side.wait_event(landed.done)
            if not landed.covered:
                if plan.sample is None:  # what was written (or handed over)
                    read = plan.sources if plan.landing.staged else plan.destinations
                    plan.sample = Coverage.SAMPLE.plan(read, plan.offsets)
                plan.sample.run(digest)
            self._digest_host.copy_(digest.as_bytes(), non_blocking=True)
            landed.done.record(self._side)
        return sent

    def _prepare(self, key: PlanKey, handles: GpuHandles, manifest: Manifest, kind: str, sink: Sink) -> RoundPlan:
        """Check the round against the manifest and the weights, open what is not open yet, and
        line up sources and destinations. Nothing is copied before all of this passed."""
        sizes = stream_sizes(kind, manifest)
        if len(handles.tensors) != len(sizes):
            raise ProtocolError("update_info.ipc_handles",
                                f"{len(handles.tensors)} placements for {len(sizes)} stream tensors")
        for i, (placement, size) in enumerate(zip(handles.tensors, sizes, strict=True)):
            if placement.nbytes != size:
                raise ProtocolError(f"update_info.ipc_handles.tensors.{i}",
                                    f"{placement.nbytes} bytes where the manifest needs {size}")
        if kind == "dense" and isinstance(sink, WeightStore):
            sink.adopt(manifest, self.device)
        problem = sink_verdict(kind, manifest, sink)
        if problem:
            raise ManifestMismatch(problem)
        sources = self._storages.sources(handles)
        landing = choose_landing(kind, manifest, sink, None, self.device, self.init.atomic, self._shadow,
                                 flat_target=False)
        destinations = landing.destinations or []
        for dst in destinations:
            if dst.device != self.device:
                raise TransferError(f"the weights live on {dst.device}, the transport on {self.device}")
        offsets = Layout.of_sizes(sizes).offsets
        views = shaped_views(manifest, sources) if landing.staged else []
        return RoundPlan(key, sizes, sources, destinations, offsets, landing, views)

    def close(self) -> None:
        self._storages.clear()
        self._plan = None
        self._shadow.clear()
        self._copier.close()
