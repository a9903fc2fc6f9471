"""The broadcast round shared by every collective transport (gloo on CPU, NCCL on GPU).

One round, on every party:
  1. the trainer broadcasts a JSON `RoundHeader` (manifest, update kind, packing plan);
  2. every receiver checks it against its weights; the group all-gathers the verdicts and,
     if anyone objects, every party raises `ManifestMismatch` naming the parameter, before
     one payload byte reached any weights (the group stays usable for the next round). A
     transport may move its first chunk meanwhile, into the receivers' scratch memory, so
     that the agreement overlaps the transfer (see `_lead_pieces`);
  3. the payload flows in bounded chunks, `num_buffers` of them in flight at once; the trainer
     folds what it packs into the stream checksum, each receiver what it landed;
  4. one all-gather carries every party's verdict and checksum: every party sees the same
     facts, so all of them reach the same outcome (applied everywhere, or failed everywhere
     with the reason), and the trainer learns it without a further step.

Subclasses replace only the payload pipeline (`_send_payload`, `_receive_payload`) and the
`Group`; the control steps, the checks and the commit rules live here once.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from weightsync.errors import IntegrityError, ManifestMismatch, ProtocolError, SourceMismatch, TransferError
from weightsync.integrity import DIGEST_BYTES, StreamDigest, format_digest
from weightsync.landing import (
    Landing, LoaderSink, Shadow, Sink, StagedLoad, StagingPlan, check_indices, choose_landing,
    sink_verdict, stream_sizes,
)
from weightsync.layout import DEFAULT_ALIGNMENT, Chunk, Layout
from weightsync.packing import RegionPlan, as_bytes, landed_regions, pack_regions, unpack_regions
from weightsync.protocol import Manifest, RoundHeader, TensorSpec, UpdateInfo, parse
from weightsync.rendezvous import agree_options
from weightsync.source import WeightSource, checked_items, manifest_of
from weightsync.store import WeightStore
from weightsync.transports.base import RoundStats, SparsePatch, Transport
from weightsync.transports.options import TransportOptions

VERDICT_BYTES = 1024  # room for one party's error message in an agreement step
SLOT_BYTES = VERDICT_BYTES + DIGEST_BYTES  # one party's share of an agreement: message, checksum
LEAD_MAX_PIECES = 64  # a round moves ahead of its agreement only a first chunk of this few pieces
HEADER_BLOCK = 64 << 10  # the header's first broadcast; longer headers take one more
MAX_HEADER_BYTES = 1 << 28
TRACE: list[tuple[str, float]] | None = None  # diagnosis: set to a list to record when each step ended


def mark(label: str) -> None:
    """Record a step of the round on the monotonic clock (shared by processes of a host)."""
    if TRACE is not None:
        TRACE.append((label, time.monotonic()))


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

    def gather_to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's copy of `tensor`, stacked, in host memory (blocking, bounded)."""
        return torch.stack([t.cpu() for t in self.all_gather(tensor)])

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def empty(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor on this group's device to receive into."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of a tensor whose producing collective was waited for."""
        return tensor.cpu()

    def synchronize(self) -> None:
        """Wait until queued copies on this group's device are done (a no-op on CPU)."""

    def check_usable(self) -> None:
        """Raise TransferError at once if an earlier failure ended this group."""

    def fail(self) -> None:
        """A step of the round timed out: the parties are out of step, so the group is over."""

    @abstractmethod
    def close(self) -> None: ...


@dataclass(frozen=True)
class Verdicts:
    """What one agreement step told every party: each rank's objection and checksum."""

    messages: list[str]
    digests: list[str | None]

    def objections(self) -> list[str]:
        by_message: dict[str, list[int]] = {}
        for rank, message in enumerate(self.messages):
            if message:
                by_message.setdefault(message, []).append(rank)
        return [f"rank {', '.join(map(str, ranks))}: {message}" for message, ranks in by_message.items()]

    def checksum_mismatches(self) -> list[int]:
        """Receivers whose checksum differs from the trainer's (rank 0's)."""
        sent = self.digests[0]
        if sent is None:
            return []
        return [rank for rank, got in enumerate(self.digests) if rank and got != sent]


def _encode_slot(message: str | None, digest: bytes = bytes(DIGEST_BYTES)) -> bytes:
    """One party's share of an agreement step: its objection (NUL-padded), then its checksum."""
    return (message or "").encode()[: VERDICT_BYTES - 1].ljust(VERDICT_BYTES, b"\0") + digest


def _decode_slots(rows: Sequence[bytes], with_digest: bool) -> Verdicts:
    messages, digests = [], []
    for raw in rows:
        if len(raw) != SLOT_BYTES:
            raise TransferError(f"an agreement step carried {len(raw)} bytes, not {SLOT_BYTES}")
        messages.append(raw[:VERDICT_BYTES].split(b"\0", 1)[0].decode(errors="replace"))
        digests.append(format_digest(raw[VERDICT_BYTES:]) if with_digest else None)
    return Verdicts(messages, digests)


class CollectiveOptions(TransportOptions):
    """Options of every collective transport (init_info.options)."""

    # Chunk sizes ramp up at the start of the stream and down at its end, so that a pipelined
    # transport fills and drains in small steps; off: every chunk is packed_buffer_size_bytes.
    # It decides where each chunk ends, so both ends must agree (they do, at init).
    ramp: bool = False


def agree_options_over_group(group: Group, options: TransportOptions) -> None:
    """For a group without a rendezvous store (nccl from a trainer-minted id): all-gather every
    party's options over the group itself and compare them as `open_store` does."""
    body = json.dumps(options.agreed(), sort_keys=True)
    if len(body.encode()) >= VERDICT_BYTES:
        raise TransferError(f"the transport options take {len(body)} bytes, more than an agreement slot holds")
    slot = group.to_device(torch.frombuffer(bytearray(_encode_slot(body)), dtype=torch.uint8))
    rows = group.gather_to_host(slot)
    agree_options([json.loads(message) if message else None
                   for message in _decode_slots([row.numpy().tobytes() for row in rows], False).messages])


class CollectiveTransport(Transport):
    """A transport whose payload moves by broadcast over a `Group`."""

    options_model = CollectiveOptions
    # How round headers decode, strictly: a transport with header fields of its own subclasses it.
    header_model: type[RoundHeader] = RoundHeader

    def __init__(self, init, rank, device, group: Group):
        super().__init__(init, rank, device)
        self.group = group
        self._buffers: list[torch.Tensor] = []
        self._staging_flat: torch.Tensor | None = None  # the one allocation `_buffers` are slices of
        self._shadow = Shadow()  # receiver: where an atomic round lands
        self._staging_plans: dict[tuple, StagingPlan] = {}  # receiver: loader rounds' staging
        self._manifests: dict[tuple, Manifest] = {}  # trainer: manifest per (name, dtype, shape) key
        self._header_cache: tuple[dict, RoundHeader] | None = None  # receiver: last parsed header
        self._checked: tuple[WeightStore, Manifest, int, str | None] | None = None  # direct sinks
        self._layouts: dict[tuple, tuple[Layout, list[Chunk]]] = {}
        self.timings: dict[str, float] = {}  # seconds per phase of the last round
        self._repeat: tuple[tuple, Manifest, list[torch.Tensor], bool] | None = None  # trainer: last round
        self._sizes: tuple[Manifest, str, tuple[int, ...]] | None = None  # receiver: last stream sizes
        self._control_seq = 0  # steps taken over the rendezvous store (when the group uses it)
        self._forgotten = 0  # trainer: control steps whose keys are deleted
        self._agreed_body: bytes | None = None  # trainer: header body the receivers last agreed to
        self._header_bytes: tuple[bytes, RoundHeader, str] | None = None  # receiver: body, header, fingerprint
        self._header_json: tuple[tuple, bytes, Manifest, str] | None = None  # trainer: key, body, manifest, fingerprint
        self._digest_host: torch.Tensor | None = None  # pinned landing place of the final checksum
        self._orphan_lead: list[int] = []  # receiver: lead pieces of a header it does not hold
        self._loader_round = False  # receiver: this round stages for a loader (see `landing`)

    # -- helpers the subclasses may refine ----------------------------------------------
    def _staging_buffers(self, count: int) -> list[torch.Tensor]:
        """`count` reusable uint8 buffers of the packed size, allocated once per group, as
        consecutive slices of one area (a loader round stages across them, see `landing`)."""
        size = self.init.packed_buffer_size_bytes
        if self._buffers and (self._buffers[0].numel() != size or len(self._buffers) < count):
            self._buffers = []
            self._staging_flat = None  # free it before allocating anew
        if not self._buffers:
            self._staging_flat = torch.empty(count * size, dtype=torch.uint8, device=self.device)
            self._buffers = [self._staging_flat[k * size : (k + 1) * size] for k in range(count)]
        return self._buffers[:count]

    def _staging_area(self, count: int) -> torch.Tensor:
        """The `count` staging buffers as one flat area."""
        self._staging_buffers(count)
        return self._staging_flat[: count * self.init.packed_buffer_size_bytes]

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def _exchange(self, message: str | None, digest: StreamDigest | None = None) -> Verdicts:
        """One agreement step: all-gather every rank's objection (and checksum, if any)."""
        return self._collect(self._post(message, digest))

    def _post(self, message: str | None, digest: StreamDigest | None = None, gpu_done: bool = True,
              with_header: tuple[str, bytes] | None = None):
        """First half of an agreement step: make this rank's verdict known (over the store, at
        once; over the group, at `_collect`). The caller may work in between.

        `gpu_done`: the verdict vouches for GPU work, so wait for it first (the header checks
        before the payload need not). `with_header`: the trainer's header, posted in the same
        store call as its verdict."""
        control = getattr(self.group, "control_store", None)
        if control is None:
            return ("group", message, digest)
        copied = self._digest_to_host(digest) if digest is not None else None
        if gpu_done:
            self.group.synchronize()  # bounded wait
            mark("exchange: synchronized")
        slot = _encode_slot(message, bytes(DIGEST_BYTES) if copied is None else copied.numpy().tobytes())
        self._control_seq += 1
        keys = [f"ctl/{self._control_seq}/{rank}" for rank in range(self.group.world_size)]
        if with_header is None:
            control.set(keys[self.group.rank], slot)
        else:
            control.multi_set([with_header[0], keys[self.group.rank]], [with_header[1], slot])
        mark("exchange: posted")
        return ("store", keys, digest is not None)

    def _collect(self, ticket) -> Verdicts:
        """Second half of an agreement step: every rank's verdict."""
        if ticket[0] == "group":
            return self._exchange_over_group(ticket[1], ticket[2])
        _, keys, with_digest = ticket
        store = self.group.control_store
        try:  # blocks until every key is there, at most the group's timeout (one round trip)
            rows = store.multi_get(keys)
        except Exception as error:  # the store raises on its timeout
            self.group.fail()
            raise TransferError(f"agreement step timed out after {self.init.timeout_seconds:g}s "
                                f"(a party is missing or stopped): {error}") from error
        mark("exchange: gathered")
        return _decode_slots(rows, with_digest)

    def _digest_to_host(self, digest: StreamDigest) -> torch.Tensor:
        """Start copying the checksum to host memory behind the GPU work it sums, so that reading
        it after the wait costs no further GPU call (the wait itself is the synchronisation)."""
        if digest.device.type != "cuda":
            return digest.as_bytes().cpu()
        if self._digest_host is None:
            self._digest_host = torch.empty(DIGEST_BYTES, dtype=torch.uint8, pin_memory=True)
        self._digest_host.copy_(digest.as_bytes(), non_blocking=True)
        return self._digest_host

    def _forget_old_steps(self) -> None:
        """Trainer: delete the control keys of rounds ago (every party has read them). Called
        while the payload moves, when the host has nothing else to do."""
        store = getattr(self.group, "control_store", None)
        if store is None or self.group.rank != 0:
            return
        while self._forgotten < self._control_seq - 6:
            self._forgotten += 1
            for suffix in ("header", *range(self.group.world_size)):
                store.delete_key(f"ctl/{self._forgotten}/{suffix}")

    def _exchange_over_group(self, message: str | None, digest: StreamDigest | None) -> Verdicts:
        slot = self.group.to_device(torch.frombuffer(bytearray(_encode_slot(message)), dtype=torch.uint8))
        if digest is not None:
            slot[VERDICT_BYTES:].copy_(digest.as_bytes())
        mark("exchange: slot on device")
        rows = self.group.gather_to_host(slot)
        mark("exchange: gathered")
        return _decode_slots([row.numpy().tobytes() for row in rows], digest is not None)

    def _chunks(self, sizes: tuple[int, ...], header: RoundHeader) -> tuple[Layout, list[Chunk]]:
        ramp = self.options.ramp
        key = (sizes, header.alignment, header.buffer_size_bytes, ramp)
        if key not in self._layouts:
            if len(self._layouts) > 8:
                self._layouts.clear()
            layout = Layout.of_sizes(list(sizes), header.alignment)
            self._layouts[key] = (layout, layout.chunks(header.buffer_size_bytes, ramp=ramp))
        return self._layouts[key]

    # -- header ---------------------------------------------------------------------------
    def _header_bytes_of(self, header: RoundHeader, lead: Sequence[int] = ()) -> bytes:
        """The header's JSON; all but the round id is cached per manifest and plan. `lead`: the
        byte counts of the broadcasts that go ahead of the agreement (see `_lead_pieces`); a
        header sent by name carries them, so that a receiver not holding it can still take part."""
        key = (id(header.manifest), type(header),
               *(value for name, value in header if name not in ("round_id", "manifest")))
        cached = self._header_json
        if cached is None or cached[0] != key or cached[2] is not header.manifest:
            full = header.model_dump_json().encode()
            body = full[full.index(b'"', 13):]
            cached = self._header_json = (key, body, header.manifest, _fingerprint(body))
        if self._agreed_body is cached[1]:  # every receiver holds this header: name it only
            return b'{"round_id":"%s","repeat_of":"%s","lead_pieces":%s}' % (
                header.round_id.encode(), cached[3].encode(), json.dumps(list(lead)).encode())
        return b'{"round_id":"' + header.round_id.encode() + cached[1]

    def _send_header(self, header: RoundHeader, lead: Sequence[int] = ()) -> tuple[str, bytes] | None:
        """Broadcast the header over the group; over a store, return the (key, value) for
        `_post` to set together with the trainer's verdict."""
        data = self._header_bytes_of(header, lead)
        control = getattr(self.group, "control_store", None)
        if control is not None:
            self._control_seq += 1
            return f"ctl/{self._control_seq}/header", data
        block = torch.zeros(HEADER_BLOCK, dtype=torch.uint8)
        block[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
        first = data[: HEADER_BLOCK - 8]
        block[8 : 8 + len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
        on_device = self.group.to_device(block)
        mark("header: on device")
        pending = self.group.broadcast(on_device)
        mark("header: broadcast called")
        pending.wait()
        mark("header: sent")
        if len(data) > len(first):
            rest = torch.frombuffer(bytearray(data[len(first):]), dtype=torch.uint8)
            self.group.broadcast(self.group.to_device(rest)).wait()
        return None

    def _receive_header(self) -> RoundHeader:
        control = getattr(self.group, "control_store", None)
        if control is not None:
            self._control_seq += 1
            key = f"ctl/{self._control_seq}/header"
            try:
                data = control.get(key)  # blocks until it is there, at most the group's timeout
            except Exception as error:  # the store raises on its timeout
                self.group.fail()
                raise TransferError(f"no round header came within {self.init.timeout_seconds:g}s: {error}") from error
            mark("header: received")
            return self._header_from_bytes(data)
        block = self.group.empty(HEADER_BLOCK)
        pending = self.group.broadcast(block)
        mark("header: broadcast called")
        pending.wait()
        mark("header: received")
        host = self.group.to_host(block)
        size = int(host[:8].view(torch.int64).item())
        if not 0 < size <= MAX_HEADER_BYTES:
            raise TransferError(f"round header of {size} bytes is out of range")
        data = bytes(host[8 : 8 + min(size, HEADER_BLOCK - 8)].numpy())
        if size > HEADER_BLOCK - 8:
            rest = self.group.empty(size - len(data))
            self.group.broadcast(rest).wait()
            data += bytes(self.group.to_host(rest).numpy())
        return self._header_from_bytes(data)

    def _header_from_bytes(self, data: bytes) -> RoundHeader | None:
        """Parse a header; one equal, byte for byte, to the last one but for its round id is
        reused without parsing (hundreds of tensors take about a millisecond to validate). A
        header that only names the last one ("repeat_of", sent once every receiver agreed to
        it) is that one with a new round id; None when this receiver does not hold it (then
        `_orphan_lead` holds what the round moves ahead of the agreement)."""
        prefix = b'{"round_id":"'
        end = data.find(b'"', len(prefix)) if data.startswith(prefix) else -1
        cached = self._header_bytes
        if end > len(prefix) and data[end:].startswith(b'","repeat_of":"') and len(data) <= 4096:
            try:
                raw = json.loads(data)
            except ValueError as error:
                raise TransferError(f"round header is not JSON: {error}") from None
            round_id, repeat_of, lead = raw.get("round_id"), raw.get("repeat_of"), raw.get("lead_pieces", [])
            if not (isinstance(round_id, str) and round_id.isalnum() and len(round_id) <= 64):
                raise TransferError("round header: round_id must be 1-64 letters or digits")
            if not (isinstance(lead, list) and len(lead) <= LEAD_MAX_PIECES
                    and all(type(n) is int and n > 0 for n in lead)):
                raise TransferError(f"round header: lead_pieces must be a list of at most {LEAD_MAX_PIECES} "
                                    "positive byte counts")
            if cached is None or repeat_of != cached[2]:
                self._orphan_lead = lead
                return None
            mark("header: parsed")
            return cached[1].model_copy(update={"round_id": round_id})
        if end > len(prefix) and cached is not None and data[end:] == cached[0]:
            round_id = data[len(prefix) : end].decode("ascii", errors="replace")
            if round_id.isalnum() and len(round_id) <= 64:
                mark("header: parsed")
                return cached[1].model_copy(update={"round_id": round_id})
        try:
            raw = json.loads(data)
        except ValueError as error:
            raise TransferError(f"round header is not JSON: {error}") from None
        header = self._parse_header(raw)
        if end > len(prefix):
            self._header_bytes = (data[end:], header, _fingerprint(data[end:]))
        mark("header: parsed")
        return header

    def _parse_header(self, raw: object) -> RoundHeader:
        """Validate a header; a header equal to the last one but for its round id is reused
        (validating a manifest of hundreds of tensors costs about a millisecond)."""
        if isinstance(raw, dict) and self._header_cache is not None:
            round_id = raw.get("round_id")
            cached_raw, cached = self._header_cache
            if isinstance(round_id, str) and 0 < len(round_id) <= 64 and \
                    {**raw, "round_id": cached.round_id} == cached_raw:
                return cached.model_copy(update={"round_id": round_id})
        header = parse(self.header_model, raw, "header")
        self._header_cache = (raw, header)
        return header

    # -- trainer side -----------------------------------------------------------------------
    def _manifest_of(self, named: list[tuple[str, torch.Tensor]]) -> Manifest:
        key = tuple((name, t.dtype, tuple(t.shape)) for name, t in named)
        manifest = self._manifests.get(key)
        if manifest is None:
            if len(self._manifests) > 8:
                self._manifests.clear()
            manifest = self._manifests[key] = Manifest.of(named)
        return manifest

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> RoundStats:
        named = list(named_tensors)
        # One pass over the tensors says whether this round repeats the last one (an optimizer
        # updates parameters in place): then its manifest and byte views are reused as they are.
        # Building them anew costs about a millisecond for hundreds of tensors, before the header.
        key = tuple((name, t.data_ptr(), t.dtype, t.shape, t.is_contiguous(), t.device) for name, t in named)
        cached = self._repeat
        if cached is None or cached[0] != key:
            views, lendable = self._byte_views([t for _, t in named])
            cached = (key, self._manifest_of(named), views, lendable)
            self._repeat = cached if lendable else None  # views of copies are not worth keeping
        _, manifest, views, lendable = cached
        return self._send_round(manifest, views, "dense", lendable)

    def send_source(self, source: WeightSource, on_iterate: Callable[[], None] | None = None) -> RoundStats:
        """Stream a source: the header and manifest from its metadata, the payload from its
        iteration, one tensor materialized at a time (see `_send_streamed`); `on_iterate` is
        called once the receivers agreed, right before the iteration starts."""
        manifest = manifest_of(source)
        key = ("source", manifest.tensors)  # the same manifest object while the metadata holds,
        manifest = self._manifests.setdefault(key, manifest)  # so its header is sent by name
        if len(self._manifests) > 8:
            self._manifests.clear()
        return self._send_round(manifest, [], "dense", False, streamed=(source, on_iterate))

    def send_sparse(self, patches: Iterable[SparsePatch]) -> RoundStats:
        patches = list(patches)
        specs, sources = [], []
        for p in patches:
            if p.indices.shape != p.values.shape or p.indices.dim() != 1:
                raise ProtocolError(f"patches[{p.name}]", "indices and values must be 1-D and equally long")
            # In a sparse manifest each entry's shape is the patch length [nnz]; dtype is the parameter's.
            specs.append(TensorSpec.of(p.name, p.values))
            sources += [p.indices.to(torch.int64), p.values]
        views, lendable = self._byte_views(sources)
        return self._send_round(Manifest(tensors=tuple(specs)), views, "sparse_flat", lendable)

    def _byte_views(self, sources: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
        """Flat uint8 views of the stream's tensors on this device, and whether they are the
        caller's own memory (every tensor contiguous here) rather than copies."""
        lendable = all(t.is_contiguous() and t.device == self.device for t in sources)
        return [as_bytes(self._to_device(t)) for t in sources], lendable

    def _send_round(self, manifest: Manifest, flat_sources: list[torch.Tensor], kind: str,
                    lendable: bool, streamed: tuple[WeightSource, Callable | None] | None = None) -> RoundStats:
        """`flat_sources`: uint8 views of the stream's tensors on this device; `lendable`: they
        are the caller's own contiguous tensors (not copies), so they may move directly.
        `streamed`: (source, on_iterate) instead: sizes from the manifest, payload from the
        source's iteration (packed, nothing moves ahead of the agreement)."""
        started = time.perf_counter()
        mark("send: start")
        self.group.check_usable()
        header = self.header_model(
            round_id=uuid.uuid4().hex,
            update_kind=kind,
            manifest=manifest,
            buffer_size_bytes=self.init.packed_buffer_size_bytes,
            num_buffers=self.init.packed_num_buffers,
            alignment=DEFAULT_ALIGNMENT,
            verify=self.init.verify,
            **self._header_fields(lendable, streamed is not None),
        )
        sizes = tuple(s.numel() for s in flat_sources) if streamed is None else \
            tuple(spec.nbytes for spec in manifest.tensors)
        layout, chunks = self._chunks(sizes, header)
        ticket = self._post(None, gpu_done=False,
                            with_header=self._send_header(header, self._lead_pieces(chunks, header)))
        # Everything that needs no receiver happens while they check the header.
        marks = [("header+prepare", time.perf_counter())]
        digest = StreamDigest(self.device) if header.verify else None
        if streamed is None:
            self._prepare_send(chunks, flat_sources, header, digest)  # e.g. pack, send the lead chunk
        mark("send: prepared")
        objections = self._collect(ticket).objections()
        marks.append(("header+agree", time.perf_counter()))
        if objections:
            self._agreed_body = None  # the next header goes out whole
            self._abandon_send()
            raise ManifestMismatch("; ".join(objections))
        self._agreed_body = self._header_json[1]
        problem = None
        if streamed is None:
            self._send_payload(chunks, flat_sources, header, digest)
        else:
            problem = self._send_streamed(chunks, layout, manifest, streamed, header, digest)
        mark("send: payload enqueued")
        self._forget_old_steps()
        marks.append(("enqueue", time.perf_counter()))
        outcome = self._exchange(problem and problem[0], digest)  # a source's failure fails the round everywhere
        marks.append(("payload+agree", time.perf_counter()))
        if problem is not None:
            raise problem[1](f"round not applied: {problem[0]}")
        self.timings = _phases(started, marks)
        failures = outcome.objections() + [
            f"rank {rank}: checksum mismatch: received {outcome.digests[rank]}, trainer sent {outcome.digests[0]}"
            for rank in outcome.checksum_mismatches()]
        if failures:
            raise TransferError("receivers did not apply the round: " + "; ".join(failures))
        return RoundStats(header.round_id, kind, len(manifest.tensors), layout.total_bytes,
                          len(chunks), time.perf_counter() - started, checksum=outcome.digests[0],
                          direct=self._is_direct(header))

    def _send_streamed(self, chunks: Sequence[Chunk], layout: Layout, manifest: Manifest,
                       streamed: tuple[WeightSource, Callable | None], header: RoundHeader,
                       digest: StreamDigest | None) -> tuple[str, type[TransferError]] | None:
        """Pack and broadcast each chunk, `num_buffers` in flight, materializing the source's
        tensors as the chunks reach them and dropping each once its last byte is packed: the
        trainer holds the buffers plus the tensor(s) the current chunk spans.

        Returns why the source failed the round (its iteration disagreed with its metadata:
        SourceMismatch; or it raised: TransferError), naming the parameter; None if it did not.
        Either way every chunk is sent (what the source could not give goes as zeros), so that
        the receivers complete the round and learn the reason in the final agreement instead of
        waiting on a broadcast that never comes (a receiver that lands in place then holds a
        touched round, and says so; with `atomic` it holds none of it). After a disagreement the
        iteration is still driven to its end, discarding what it yields: on a sharded trainer
        every rank materializes each tensor together."""
        source, on_iterate = streamed
        problem: tuple[str, type[TransferError]] | None = None
        if on_iterate is not None:
            try:
                on_iterate()
            except Exception as error:  # noqa: BLE001 - e.g. a sharded trainer's rank is gone
                problem = (f"the source could not start: {type(error).__name__}: {error}", TransferError)
        iterator = iter(source)
        items = checked_items(manifest, iterator)
        held: dict[int, torch.Tensor] = {}
        ready = 0  # tensors materialized (or replaced by zeros) so far

        def materialize(upto: int) -> None:
            nonlocal problem, ready
            while ready <= upto:
                spec = manifest.tensors[ready]
                flat = None
                if problem is None:
                    try:
                        flat = as_bytes(self._to_device(next(items)))
                    except SourceMismatch as error:
                        problem = (str(error), SourceMismatch)
                        _drain(iterator)
                    except Exception as error:  # noqa: BLE001 - reported to every party
                        problem = (f"parameter {spec.name!r}: the source failed to materialize it: "
                                   f"{type(error).__name__}: {error}", TransferError)
                if flat is None:
                    flat = torch.zeros(spec.nbytes, dtype=torch.uint8, device=self.device)
                held[ready] = flat
                ready += 1

        num_buffers = header.num_buffers
        buffers = self._staging_buffers(num_buffers)
        in_flight: deque[Pending] = deque()
        for chunk in chunks:
            if len(in_flight) == num_buffers:
                in_flight.popleft().wait()
            if chunk.segments:
                materialize(chunk.segments[-1].index)
            buffer = buffers[chunk.number % num_buffers]
            RegionPlan(pack_regions(chunk, held, buffer), copy=True, digest=digest is not None).run(digest)
            for s in chunk.segments:
                if s.stop == layout.sizes[s.index]:
                    held.pop(s.index, None)  # its last byte is packed (same-stream order on a GPU)
            in_flight.append(self.group.broadcast(buffer[: chunk.nbytes]))
            for index in [i for i in held if layout.sizes[i] == 0]:
                del held[index]
        materialize(len(manifest.tensors) - 1)  # trailing empty tensors: still checked
        held.clear()
        if problem is None:
            try:
                next(items, None)  # raises if the iteration yields more than the metadata names
            except SourceMismatch as error:
                problem = (str(error), SourceMismatch)
                _drain(iterator)
            except Exception as error:  # noqa: BLE001
                problem = (f"the source failed after its last parameter: {type(error).__name__}: {error}",
                           TransferError)
        while in_flight:
            in_flight.popleft().wait()
        return problem

    def _header_fields(self, lendable: bool, streamed: bool) -> dict:
        """The trainer's values of the transport's own header fields (`header_model`) for a round
        whose sources are `lendable` (the caller's own contiguous tensors) or `streamed` (from a
        source's iteration); none by default."""
        return {}

    def _is_direct(self, header: RoundHeader) -> bool:
        """Whether each tensor piece of this round moves on its own, from where it lives to where
        it belongs, instead of through packed buffers (nccl's direct rounds); never by default."""
        return False

    def _lead_pieces(self, chunks: Sequence[Chunk], header: RoundHeader) -> list[int]:
        """Byte counts of the broadcasts that move ahead of the agreement, in order: a transport
        that overlaps the agreement with its first chunk names them (both ends derive them from
        the header alike); none by default."""
        return []

    def _prepare_send(self, chunks: Sequence[Chunk], sources: Sequence[torch.Tensor], header: RoundHeader,
                      digest: StreamDigest | None) -> None:
        """Trainer, while the receivers check the header: anything that lands nothing in their
        weights (a pipelined transport packs its first chunks and sends its lead chunk)."""

    def _abandon_send(self) -> None:
        """Trainer: the receivers refused the header; settle `_prepare_send` (bounded)."""

    def _send_payload(self, chunks: Sequence[Chunk], sources: Sequence[torch.Tensor], header: RoundHeader,
                      digest: StreamDigest | None) -> None:
        """Pack each chunk (folding it into the checksum) and broadcast it, `num_buffers` in flight."""
        num_buffers = header.num_buffers
        buffers = self._staging_buffers(num_buffers)
        in_flight: deque[Pending] = deque()
        for chunk in chunks:
            if len(in_flight) == num_buffers:
                in_flight.popleft().wait()
            buffer = buffers[chunk.number % num_buffers]
            RegionPlan(pack_regions(chunk, sources, buffer), copy=True, digest=digest is not None).run(digest)
            in_flight.append(self.group.broadcast(buffer[: chunk.nbytes]))
        while in_flight:
            in_flight.popleft().wait()

    # -- receiver side ----------------------------------------------------------------------
    def receive(self, sink: Sink, info: UpdateInfo) -> RoundStats:
        """Check the header, land the payload, verify it, then commit; see the module docstring.

        `sink`: a `WeightStore` (direct) or a `LoaderSink` (see `weightsync.landing`). Dense rounds
        land in place (the live weights), or with `atomic` in a shadow copy that is switched in
        (handed to the loader) only once the whole round verified; into a loader without `atomic`
        each tensor is handed over as soon as its bytes are in, from bounded staging. Sparse rounds
        always land in scratch tensors and are applied only after every receiver validated them.
        """
        started = time.perf_counter()
        mark("receive: start")
        self.group.check_usable()
        loader = sink if isinstance(sink, LoaderSink) else None
        self._loader_round = loader is not None and not self.init.atomic
        if loader is not None:
            loader.begin_round()
            if self._loader_round:  # the lead chunk, if any, lands where the staging starts
                self._staging_buffers(self.init.packed_num_buffers)
        header = self._receive_header()
        if header is None:
            problem = ("the trainer named a round header this receiver does not hold; "
                       "it sends the whole header next round")
            self._receive_lead(self._orphan_lead, None, None)  # take part in what moves ahead, drop it
            try:
                self._collect(self._post(problem, gpu_done=False))
            finally:
                self._abandon_receive()
            raise ManifestMismatch(problem)
        layout, chunks = self._chunks(self._stream_sizes_of(header), header)
        self._receive_lead(self._lead_pieces(chunks, header), chunks[0] if chunks else None, header)
        staged = None
        try:
            if header.update_kind == "dense" and loader is None:
                sink.adopt(header.manifest, self.device)
            problem = self._check_header(header, sink, info)
            landing = None
            if problem is None:
                landing = choose_landing(header.update_kind, header.manifest, sink, layout, self.device,
                                         self.init.atomic, self._shadow)
                if landing.staged:  # a loader round: is the staging bound enough? (before agreeing)
                    try:
                        staged = self._staged_load(header, layout, chunks, loader)
                    except TransferError as error:
                        problem = str(error)
            mark("receive: header checked")
            ticket = self._post(problem, gpu_done=False)
            if problem is None:  # get ready while the others' verdicts come in
                digest = StreamDigest(self.device) if header.verify else None
                if staged is None:
                    self._prepare_receive(chunks, header, digest, landing)
                mark("receive: prepared")
            objections = self._collect(ticket).objections()
            if objections:
                raise ManifestMismatch("; ".join(objections))
        except BaseException:
            self._abandon_receive()
            raise
        marks = [("header+agree", time.perf_counter())]
        try:
            problem = None
            if staged is not None:
                problem = self._receive_staged(staged, chunks, header, digest, loader)
            else:
                self._receive_payload(chunks, header, digest, landing)
            marks.append(("enqueue", time.perf_counter()))
            if header.update_kind == "sparse_flat":
                problem = check_indices(header.manifest, landing.scratch, sink)
            outcome = self._exchange(problem, digest)
            marks.append(("payload+agree", time.perf_counter()))
            bad_sums = outcome.checksum_mismatches()
            objections = outcome.objections() + [
                f"rank {rank}: checksum mismatch: received {outcome.digests[rank]}, "
                f"trainer sent {outcome.digests[0]}" for rank in bad_sums]
            if objections:
                kind = IntegrityError if self.rank in bad_sums else TransferError
                raise kind("round not applied: " + "; ".join(objections))
        except TransferError as error:
            # Unless the round landed in a shadow copy or scratch, the live weights hold part of it.
            error.weights_touched = landing.touched()
            raise
        landing.commit(sink)
        self.group.synchronize()  # the weights are complete when the call returns
        marks.append(("commit", time.perf_counter()))
        self.timings = _phases(started, marks)
        checksum = outcome.digests[self.rank] if digest is not None else None
        return RoundStats(header.round_id, header.update_kind, len(header.manifest.tensors),
                          layout.total_bytes, len(chunks), time.perf_counter() - started,
                          in_place=landing.in_place, checksum=checksum, direct=self._is_direct(header))

    def _stream_sizes_of(self, header: RoundHeader) -> tuple[int, ...]:
        """The header's stream sizes; cached while headers carry the same manifest object (a
        repeated header is reused, see `_header_from_bytes`)."""
        cached = self._sizes
        if cached is None or cached[0] is not header.manifest or cached[1] != header.update_kind:
            cached = self._sizes = (header.manifest, header.update_kind,
                                    tuple(stream_sizes(header.update_kind, header.manifest)))
        return cached[2]

    # -- a loader round: bounded staging ------------------------------------------------------
    def _staged_load(self, header: RoundHeader, layout: Layout, chunks: list[Chunk],
                     loader: LoaderSink) -> StagedLoad:
        """The staging plan of a loader round (TransferError naming the tensor and the bound when
        the round does not fit in packed_num_buffers x packed_buffer_size_bytes)."""
        count = self.init.packed_num_buffers
        capacity = count * self.init.packed_buffer_size_bytes
        run_ends = loader.run_ends(header.manifest)
        piecewise = self._is_direct(header)  # each tensor piece is its own broadcast: placed on its own
        key = (id(chunks), capacity, id(header.manifest), tuple(run_ends), piecewise)
        plan = self._staging_plans.get(key)
        if plan is None:
            if len(self._staging_plans) > 8:
                self._staging_plans.clear()
            plan = StagingPlan.build(layout, chunks, capacity, header.manifest.names, run_ends, piecewise)
            self._staging_plans[key] = plan
            plan.views["keep"] = (chunks, header.manifest)  # the key's ids stay valid
        area = self._staging_area(count)
        loader.staging_bytes = area.numel()
        return StagedLoad(plan, area, header.manifest, chunks, layout, header.verify)

    def _receive_staged(self, staged: StagedLoad, chunks: Sequence[Chunk], header: RoundHeader,
                        digest: StreamDigest | None, loader: LoaderSink) -> str | None:
        """Receive every chunk into its place in the staging area and hand each completed fused
        group to the loader while later chunks are still in flight; the loader's failure, if any."""
        lead = self._lead_landed(staged) if chunks else None
        failure = staged.run(lambda number: self._post_chunk(staged, number, header),
                             lambda pending: pending.wait(), loader, digest, header.num_buffers,
                             self._side_programs(), first=lead)
        self.group.synchronize()
        return failure

    def _post_chunk(self, staged: StagedLoad, number: int, header: RoundHeader) -> Pending:
        """Start receiving chunk `number` into its staging place."""
        return self.group.broadcast(staged.view(number))

    def _lead_landed(self, staged: StagedLoad) -> Pending | None:
        """A loader round's first chunk when it moved ahead of the agreement (see
        `_receive_lead`): a handle that waits until it is in its staging place. None: not sent ahead."""
        return None

    def _side_programs(self) -> int | None:
        """GPU programs a checksum beside the transfer may use (None: all it takes)."""
        return None

    def _receive_lead(self, pieces: Sequence[int], chunk: Chunk | None, header: RoundHeader | None) -> None:
        """Receiver, before its own checks: receive the broadcasts the trainer sends ahead of the
        agreement (`pieces`: the `header`'s first `chunk`, or only their sizes when this receiver
        does not hold the header) into scratch memory, never into the weights. None by default."""

    def _abandon_receive(self) -> None:
        """Receiver: the round was refused; wait (bounded) for `_receive_lead` to complete."""

    def _prepare_receive(self, chunks: Sequence[Chunk], header: RoundHeader, digest: StreamDigest | None,
                         landing: Landing) -> None:
        """Receiver, while the others' verdicts come in: anything that needs no payload yet."""

    def _receive_payload(self, chunks: Sequence[Chunk], header: RoundHeader, digest: StreamDigest | None,
                         landing: Landing) -> None:
        """Receive every chunk with `num_buffers` in flight: straight into the landing target when
        there is one (no staging, no copy), else into staging buffers unpacked into destinations."""
        num_buffers = header.num_buffers
        target, destinations = landing.target, landing.destinations
        buffers = None if target is not None else self._staging_buffers(num_buffers)
        in_flight: deque[tuple[Chunk, torch.Tensor, Pending]] = deque()

        def land(chunk: Chunk, view: torch.Tensor, pending: Pending) -> None:
            pending.wait()
            if target is not None:
                plan = RegionPlan(landed_regions(chunk, target), copy=False)
            else:
                plan = RegionPlan(unpack_regions(chunk, view, destinations), copy=True)
            plan.run(digest)

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
        self.group.synchronize()

    def _check_header(self, header: RoundHeader, store: Sink, info: UpdateInfo) -> str | None:
        expected = info.manifest
        if expected is not None and expected != header.manifest:
            return _first_difference(expected, header.manifest)
        if info.update_kind is not None and info.update_kind != header.update_kind:
            return f"update_kind is {info.update_kind} here but {header.update_kind} from the trainer"
        want = info.packed_buffer_size_bytes or self.init.packed_buffer_size_bytes
        if header.buffer_size_bytes != want:
            return f"packed_buffer_size_bytes is {want} here but {header.buffer_size_bytes} from the trainer"
        if header.update_kind == "sparse_flat" or isinstance(store, LoaderSink):
            return sink_verdict(header.update_kind, header.manifest, store)
        checked = self._checked
        if checked is not None and checked[0] is store and checked[1] is header.manifest \
                and checked[2] == len(store):
            return checked[3]  # same store, same manifest object (cached header): same answer
        verdict = store.mismatch(header.manifest)
        self._checked = (store, header.manifest, len(store), verdict)
        return verdict


def _drain(iterator: Iterator) -> None:
    """Drive a source's iteration to its end, dropping what it yields (keeps a sharded trainer's
    ranks in step after rank 0 found a disagreement); a failure of its own ends it quietly (the
    round fails anyway)."""
    try:
        for _ in iterator:
            pass
    except Exception:  # noqa: BLE001 - the round already failed with the first reason
        pass


def _fingerprint(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=16).hexdigest()


def _phases(started: float, marks: list[tuple[str, float]]) -> dict[str, float]:
    """Seconds spent in each phase of the last round (for diagnosis and benchmarks)."""
    out, last = {}, started
    for name, at in marks:
        out[name] = at - last
        last = at
    return out


def _first_difference(expected: Manifest, sent: Manifest) -> str:
    """Name the first parameter where the HTTP body's manifest and the trainer's disagree."""
    for mine, theirs in zip(expected.tensors, sent.tensors):
        if mine != theirs:
            return (f"parameter {theirs.name!r}: update_info says {mine.name!r} {mine.dtype}"
                    f"{list(mine.shape)}, the trainer sends {theirs.dtype}{list(theirs.shape)}")
    return f"update_info names {len(expected.tensors)} parameters; the trainer sends {len(sent.tensors)}"
