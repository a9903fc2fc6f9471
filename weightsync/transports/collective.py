"""The broadcast round shared by every collective transport (gloo on CPU, NCCL on GPU).

One round, on every party:
  1. the trainer broadcasts a JSON `RoundHeader` (manifest, update kind, packing plan);
  2. every receiver checks it against its weights; the group all-gathers the verdicts and,
     if anyone objects, every party raises `ManifestMismatch` naming the parameter, before
     one payload byte moved (the group stays usable for the next round);
  3. the payload flows in bounded chunks, `num_buffers` of them in flight at once;
  4. every receiver reports whether it applied the round, and the trainer learns the outcome.
"""

from __future__ import annotations

import json
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from weightsync.integrity import StreamDigest
from weightsync.errors import IntegrityError, ManifestMismatch, ProtocolError, TransferError
from weightsync.layout import DEFAULT_ALIGNMENT, Chunk, Layout
from weightsync.packing import as_bytes, pack_chunk, unpack_chunk
from weightsync.protocol import Manifest, RoundHeader, TensorSpec, UpdateInfo, parse
from weightsync.store import WeightStore
from weightsync.transports.base import RoundStats, SparsePatch, Transport

VERDICT_BYTES = 1024  # room for one receiver's error message in an agreement step
DIGEST_BYTES = 64  # the trainer's hex checksum of the round's stream


class Pending(ABC):
    @abstractmethod
    def wait(self) -> None: ...


class Group(ABC):
    """The few collectives a round needs, over one transport's own communicator."""

    rank: int
    world_size: int
    device: torch.device

    @abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Pending:
        """Start broadcasting `tensor` from `src`; the returned handle waits for it."""

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of a same-shaped tensor (blocking)."""

    def synchronize(self) -> None:
        """Wait until queued copies on this group's device are done (a no-op on CPU)."""

    @abstractmethod
    def close(self) -> None: ...


def _encode_verdict(message: str | None) -> torch.Tensor:
    data = (message or "").encode()[: VERDICT_BYTES - 1]
    out = torch.zeros(VERDICT_BYTES, dtype=torch.uint8)
    out[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else out[:0]
    return out


def _decode_verdict(tensor: torch.Tensor) -> str:
    raw = bytes(tensor.cpu().tolist())
    return raw.split(b"\0", 1)[0].decode(errors="replace")


class CollectiveTransport(Transport):
    """A transport whose payload moves by broadcast over a `Group`."""

    def __init__(self, init, rank, device, group: Group):
        super().__init__(init, rank, device)
        self.group = group
        self._buffers: list[torch.Tensor] = []
        self._shadow: WeightStore | None = None

    # -- helpers the subclasses may refine ----------------------------------------------
    def _staging_buffers(self, count: int) -> list[torch.Tensor]:
        """`count` reusable uint8 buffers of the packed size, allocated once per group."""
        size = self.init.packed_buffer_size_bytes
        while len(self._buffers) < count:
            self._buffers.append(torch.empty(size, dtype=torch.uint8, device=self.device))
        return self._buffers[:count]

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def _agree(self, own_error: str | None) -> list[str]:
        """All-gather every rank's verdict (None = agree); return the objections."""
        verdicts = self.group.all_gather(self._to_device(_encode_verdict(own_error)))
        by_message: dict[str, list[int]] = {}
        for rank, message in enumerate(map(_decode_verdict, verdicts)):
            if message:
                by_message.setdefault(message, []).append(rank)
        return [f"rank {', '.join(map(str, ranks))}: {message}" for message, ranks in by_message.items()]

    # -- header ---------------------------------------------------------------------------
    def _send_header(self, header: RoundHeader) -> None:
        data = header.model_dump_json().encode()
        length = torch.tensor([len(data)], dtype=torch.int64)
        self.group.broadcast(self._to_device(length)).wait()
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.group.broadcast(self._to_device(payload)).wait()

    def _receive_header(self) -> RoundHeader:
        length = self._to_device(torch.zeros(1, dtype=torch.int64))
        self.group.broadcast(length).wait()
        size = int(length.item())
        if not 0 < size <= 1 << 28:
            raise TransferError(f"round header of {size} bytes is out of range")
        payload = self._to_device(torch.empty(size, dtype=torch.uint8))
        self.group.broadcast(payload).wait()
        try:
            data = json.loads(bytes(payload.cpu().tolist()))
        except ValueError as error:
            raise TransferError(f"round header is not JSON: {error}") from None
        return parse(RoundHeader, data, "header")

    # -- trainer side -----------------------------------------------------------------------
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> RoundStats:
        named = list(named_tensors)
        manifest = Manifest.of(named)
        return self._send_round(manifest, [t for _, t in named], "dense")

    def send_sparse(self, patches: Iterable[SparsePatch]) -> RoundStats:
        patches = list(patches)
        specs, sources = [], []
        for p in patches:
            if p.indices.shape != p.values.shape or p.indices.dim() != 1:
                raise ProtocolError(f"patches[{p.name}]", "indices and values must be 1-D and equally long")
            # In a sparse manifest each entry's shape is the patch length [nnz]; dtype is the parameter's.
            specs.append(TensorSpec.of(p.name, p.values))
            sources += [p.indices.to(torch.int64), p.values]
        return self._send_round(Manifest(tensors=tuple(specs)), sources, "sparse_flat")

    def _send_round(self, manifest, sources, kind) -> RoundStats:
        started = time.perf_counter()
        header = RoundHeader(
            round_id=uuid.uuid4().hex,
            update_kind=kind,
            manifest=manifest,
            buffer_size_bytes=self.init.packed_buffer_size_bytes,
            num_buffers=self.init.packed_num_buffers,
            alignment=DEFAULT_ALIGNMENT,
            verify=self.init.verify,
        )
        self._send_header(header)
        objections = self._agree(None)
        if objections:
            raise ManifestMismatch("; ".join(objections))
        layout = Layout.of_sizes([as_bytes(s).numel() for s in sources], header.alignment)
        chunks = layout.chunks(header.buffer_size_bytes)
        flat_sources = [as_bytes(self._to_device(s)) for s in sources]
        digest = StreamDigest(self.device) if header.verify else None
        self._pipeline_send(chunks, flat_sources, header.num_buffers, digest)
        checksum = None
        if digest is not None:
            checksum = digest.hexdigest()
            self.group.broadcast(self._to_device(_encode_digest(checksum))).wait()
        failures = self._agree(None)
        if failures:
            raise TransferError("receivers did not apply the round: " + "; ".join(failures))
        return RoundStats(header.round_id, kind, len(manifest.tensors), layout.total_bytes,
                          len(chunks), time.perf_counter() - started, checksum=checksum)

    def _pipeline_send(self, chunks: Sequence[Chunk], sources, num_buffers: int,
                       digest: StreamDigest | None) -> None:
        buffers = self._staging_buffers(num_buffers)
        in_flight: deque[Pending] = deque()
        for chunk in chunks:
            if len(in_flight) == num_buffers:
                in_flight.popleft().wait()
            packed = pack_chunk(chunk, sources, buffers[chunk.number % num_buffers])
            if digest is not None:
                digest.update(packed)
            in_flight.append(self.group.broadcast(packed))
        while in_flight:
            in_flight.popleft().wait()

    # -- receiver side ----------------------------------------------------------------------
    def receive(self, store: WeightStore, info: UpdateInfo) -> RoundStats:
        """Check the header, land the payload, verify it, then commit; see the module docstring.

        Dense rounds land in place (the live weights), or with `atomic` in a shadow copy that is
        switched in only once the whole round verified. Sparse rounds always land in scratch
        tensors and are applied only after every receiver validated them.
        """
        started = time.perf_counter()
        header = self._receive_header()
        if header.update_kind == "dense":
            store.adopt(header.manifest, self.device)
        objections = self._agree(self._check_header(header, store, info))
        if objections:
            raise ManifestMismatch("; ".join(objections))
        layout = Layout.of_sizes(_stream_sizes(header), header.alignment)
        chunks = layout.chunks(header.buffer_size_bytes)
        landing = self._landing(header, store, layout)
        digest = StreamDigest(self.device) if header.verify else None
        try:
            self._receive_payload(chunks, header.num_buffers, digest, landing.target, landing.destinations)
            self.group.synchronize()
            problem, checksum = None, None
            if digest is not None:
                checksum = digest.hexdigest()
                sent = self._to_device(torch.zeros(DIGEST_BYTES, dtype=torch.uint8))
                self.group.broadcast(sent).wait()
                if _decode_digest(sent) != checksum:
                    problem = f"checksum mismatch: received {checksum}, trainer sent {_decode_digest(sent)}"
            if problem is None and header.update_kind == "sparse_flat":
                problem = _check_indices(header, landing.scratch, store)
            objections = self._agree(problem)
            if objections:
                kind = IntegrityError if problem and problem.startswith("checksum") else TransferError
                raise kind("round not applied: " + "; ".join(objections))
        except TransferError as error:
            # Unless the round landed in a shadow copy or scratch, the live weights hold part of it.
            error.weights_touched = landing.writes_live
            raise
        landing.commit(store)
        return RoundStats(header.round_id, header.update_kind, len(header.manifest.tensors),
                          layout.total_bytes, len(chunks), time.perf_counter() - started,
                          in_place=landing.in_place, checksum=checksum)

    def _landing(self, header: RoundHeader, store: WeightStore, layout: Layout) -> "_Landing":
        if header.update_kind == "sparse_flat":
            scratch: list[torch.Tensor] = []
            for spec in header.manifest.tensors:  # per patch: its indices, then its values
                scratch += [torch.empty(spec.numel, dtype=torch.int64, device=self.device),
                            torch.empty(spec.numel, dtype=spec.torch_dtype, device=self.device)]
            return _Landing(None, [as_bytes(t) for t in scratch], scratch=scratch, sparse=header.manifest)
        if self.init.atomic:
            shadow = self._shadow_store(header.manifest)
            return _Landing(shadow.contiguous_target(header.manifest, layout), None, shadow=shadow,
                            manifest=header.manifest)
        target = store.contiguous_target(header.manifest, layout)
        if target is not None and target.device == self.device:
            return _Landing(target, None, in_place=True)
        return _Landing(None, store.destinations(header.manifest))

    def _shadow_store(self, manifest: Manifest) -> WeightStore:
        """A second copy of the weights to receive into, kept across rounds of the same manifest."""
        if self._shadow is None or self._shadow.manifest != manifest:
            self._shadow = None  # free the old one before allocating
            self._shadow = WeightStore.from_manifest(manifest, self.device)
        return self._shadow

    def _receive_payload(self, chunks: Sequence[Chunk], num_buffers: int, digest: StreamDigest | None,
                         target: torch.Tensor | None, destinations) -> None:
        """Receive every chunk with `num_buffers` in flight: straight into `target` when given
        (no staging, no copy), else into staging buffers unpacked into `destinations`."""
        buffers = None if target is not None else self._staging_buffers(num_buffers)
        in_flight: deque[tuple[Chunk, torch.Tensor, Pending]] = deque()

        def land(chunk: Chunk, view: torch.Tensor, pending: Pending) -> None:
            pending.wait()
            if digest is not None:
                digest.update(view)
            if target is None:
                unpack_chunk(chunk, view, destinations)

        for chunk in chunks:
            if len(in_flight) == num_buffers:
                land(*in_flight.popleft())
            if target is not None:
                view = target[chunk.start : chunk.stop]
            else:
                view = buffers[chunk.number % num_buffers][: chunk.nbytes]
            in_flight.append((chunk, view, self.group.broadcast(view)))
        while in_flight:
            land(*in_flight.popleft())

    def _check_header(self, header: RoundHeader, store: WeightStore, info: UpdateInfo) -> str | None:
        expected = info.manifest
        if expected is not None and expected != header.manifest:
            return _first_difference(expected, header.manifest)
        if info.update_kind is not None and info.update_kind != header.update_kind:
            return f"update_kind is {info.update_kind} here but {header.update_kind} from the trainer"
        want = info.packed_buffer_size_bytes or self.init.packed_buffer_size_bytes
        if header.buffer_size_bytes != want:
            return f"packed_buffer_size_bytes is {want} here but {header.buffer_size_bytes} from the trainer"
        if header.update_kind == "sparse_flat":
            return _check_sparse(header, store)
        return store.mismatch(header.manifest)


@dataclass
class _Landing:
    """Where a round's payload lands, and how it becomes live once the round verified."""

    target: torch.Tensor | None  # receive chunks straight into this flat buffer
    destinations: list[torch.Tensor] | None  # or unpack staged chunks into these views
    in_place: bool = False
    shadow: WeightStore | None = None
    manifest: Manifest | None = None
    scratch: list[torch.Tensor] | None = None
    sparse: Manifest | None = None

    @property
    def writes_live(self) -> bool:
        """Whether payload bytes go straight into the serving weights (neither shadow nor scratch)."""
        return self.shadow is None and self.sparse is None

    def commit(self, store: WeightStore) -> None:
        if self.shadow is not None:  # atomic: switch the verified copy in
            with store.lock:
                for spec in self.manifest.tensors:
                    store[spec.name].copy_(self.shadow[spec.name])
        elif self.sparse is not None:  # apply every validated patch
            with store.lock:
                for i, spec in enumerate(self.sparse.tensors):
                    store[spec.name].view(-1)[self.scratch[2 * i]] = self.scratch[2 * i + 1]


def _stream_sizes(header: RoundHeader) -> list[int]:
    """Byte sizes of the tensors in the round's stream (sparse: indices then values, per patch)."""
    if header.update_kind == "dense":
        return [spec.nbytes for spec in header.manifest.tensors]
    return [size for spec in header.manifest.tensors for size in (spec.numel * 8, spec.nbytes)]


def _check_sparse(header: RoundHeader, store: WeightStore) -> str | None:
    for spec in header.manifest.tensors:
        if spec.name not in store:
            return f"parameter {spec.name!r} is not in the receiver's weights"
        have = TensorSpec.of(spec.name, store[spec.name])
        if have.dtype != spec.dtype:
            return f"parameter {spec.name!r} has dtype {have.dtype} here but {spec.dtype} from the trainer"
        if len(spec.shape) != 1 or spec.numel > have.numel:
            return f"parameter {spec.name!r}: a patch must be 1-D with at most {have.numel} values"
    return None


def _check_indices(header: RoundHeader, scratch: list[torch.Tensor], store: WeightStore) -> str | None:
    """Every patch index must fall inside its parameter, checked before any patch applies."""
    for i, spec in enumerate(header.manifest.tensors):
        indices, numel = scratch[2 * i], store[spec.name].numel()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            return f"parameter {spec.name!r}: sparse index out of range [0, {numel})"
    return None


def _encode_digest(hexdigest: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(hexdigest.encode().ljust(DIGEST_BYTES, b"\0")), dtype=torch.uint8)


def _decode_digest(tensor: torch.Tensor) -> str:
    return bytes(tensor.cpu().tolist()).rstrip(b"\0").decode(errors="replace")


def _first_difference(expected: Manifest, sent: Manifest) -> str:
    """Name the first parameter where the HTTP body's manifest and the trainer's disagree."""
    for mine, theirs in zip(expected.tensors, sent.tensors):
        if mine != theirs:
            return (f"parameter {theirs.name!r}: update_info says {mine.name!r} {mine.dtype}"
                    f"{list(mine.shape)}, the trainer sends {theirs.dtype}{list(theirs.shape)}")
    return f"update_info names {len(expected.tensors)} parameters; the trainer sends {len(sent.tensors)}"
