"""The receiver side of a collective round (see `weightsync.transports.collective`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from weightsync.errors import IntegrityError, ManifestMismatch, TransferError
from weightsync.integrity import StreamDigest
from weightsync.landing import (
    Landing, LoaderSink, Shadow, Sink, StagedLoad, StagingPlan, check_indices, choose_landing, sink_verdict,
    stream_sizes,
)
from weightsync.layout import Chunk, Layout
from weightsync.protocol import Manifest, RoundHeader, UpdateInfo
from weightsync.store import WeightStore
from weightsync.transports.base import RoundStats
from weightsync.transports.collective.agreement import Agreement, Verdicts
from weightsync.transports.collective.buffers import Chunking, StagingBuffers
from weightsync.transports.collective.group import Party
from weightsync.transports.collective.paths import ReceivePath
from weightsync.transports.collective.round_header import HeaderDecoder, UnknownHeader
from weightsync.transports.collective.rules import RoundRules
from weightsync.transports.collective.trace import mark, phases


@dataclass(frozen=True)
class _StoreVerdict:
    """A direct store's verdict on a manifest, valid while the store holds as many tensors."""

    store: WeightStore
    manifest: Manifest
    size: int
    verdict: str | None


@dataclass(frozen=True)
class _StreamSizes:
    """The stream sizes of the last header's manifest and update kind."""

    manifest: Manifest
    update_kind: str
    sizes: tuple[int, ...]


@dataclass
class _Round:
    """One round at this receiver, as `receive`'s steps fill it in: the header and its stream,
    the loader (if the sink is one), where the round lands, its staging (a loader round) and the
    digest its bytes are checked with."""

    header: RoundHeader
    layout: Layout
    chunks: list[Chunk]
    loader: LoaderSink | None
    landing: Landing | None = None
    staged: StagedLoad | None = None
    digest: StreamDigest | None = None

    def landed(self) -> Landing:
        """The landing, chosen once the round was agreed to (before, there is none)."""
        assert self.landing is not None, "the round was agreed to without a landing"
        return self.landing


class CollectiveReceiver:
    """A receiver (rank > 0) of a collective group: receives each round's header, checks it
    against its sink, takes part in the agreements, and has its `ReceivePath` land the payload
    where the landing says; then verifies and commits.

    It owns the receiver's state only (header decoder, shadow copy, staging plans of loader
    rounds, verdict caches); the trainer's state lives in `CollectiveSender`."""

    def __init__(self, party: Party, rules: RoundRules[Any], path: ReceivePath, staging: StagingBuffers):
        self._party = party
        self._rules = rules
        self.path = path
        self.staging = staging
        self.agreement = Agreement(party)
        self.headers = HeaderDecoder(party, self.agreement, rules.header_model)
        self._chunking = Chunking(party)
        self._shadow = Shadow()  # where an atomic round lands
        self._staging_plans: dict[tuple[Any, ...], StagingPlan] = {}  # loader rounds' staging
        self._checked: _StoreVerdict | None = None  # direct sinks
        self._sizes: _StreamSizes | None = None
        self.timings: dict[str, float] = {}  # seconds per phase of the last round

    def receive(self, sink: Sink, info: UpdateInfo) -> RoundStats:
        """Check the header, land the payload, verify it, then commit; see the package docstring.

        `sink`: a `WeightStore` (direct) or a `LoaderSink` (see `weightsync.landing`). Dense rounds
        land in place (the live weights), or with `atomic` in a shadow copy that is switched in
        (handed to the loader) only once the whole round verified; into a loader without `atomic`
        each tensor is handed over as soon as its bytes are in, from bounded staging. Sparse rounds
        always land in scratch tensors and are applied only after every receiver validated them.
        """
        party = self._party
        started = time.perf_counter()
        mark("receive: start")
        party.group.check_usable()
        loader = sink if isinstance(sink, LoaderSink) else None
        loader_round = loader is not None and not party.init.atomic  # this round stages for a loader
        if loader is not None:
            loader.begin_round()
            if loader_round:  # the lead chunk, if any, lands where the staging starts
                self.staging.get(party.init.packed_num_buffers)
        header = self.headers.receive()
        if isinstance(header, UnknownHeader):
            self._object(header, "the trainer named a round header this receiver does not hold; "
                                 "it sends the whole header next round", loader_round)
        layout, chunks = self._chunking.of(self._stream_sizes_of(header), header)
        self.path.lead(self._rules.lead_pieces(chunks, header), chunks[0] if chunks else None, header, loader_round)
        round_ = _Round(header, layout, chunks, loader)
        self._agree(round_, sink, info)
        marks = [("header+agree", time.perf_counter())]
        outcome = self._land(round_, sink, marks)
        landing = round_.landed()
        landing.commit(sink)
        party.group.synchronize()  # the weights are complete when the call returns
        marks.append(("commit", time.perf_counter()))
        self.timings = phases(started, marks)
        checksum = outcome.digests[party.rank] if round_.digest is not None else None
        return RoundStats(header.round_id, header.update_kind, len(header.manifest.tensors),
                          layout.total_bytes, len(chunks), time.perf_counter() - started,
                          in_place=landing.in_place, checksum=checksum, direct=self._rules.is_direct(header))

    def _agree(self, round_: _Round, sink: Sink, info: UpdateInfo) -> None:
        """Post this party's verdict on the header (checked against `sink` and `info`, and for a
        loader round against the staging bound) and get ready to receive while the others'
        verdicts come in; ManifestMismatch naming every objection. On any failure the path drops
        what it readied: nothing has landed yet."""
        header = round_.header
        try:
            if header.update_kind == "dense" and isinstance(sink, WeightStore):  # not a loader
                sink.adopt(header.manifest, self._party.device)
            problem = self._check_header(header, sink, info)
            if problem is None:
                problem = self._choose_landing(round_, sink)
            mark("receive: header checked")
            ticket = self.agreement.post(problem, gpu_done=False)
            if problem is None:  # get ready while the others' verdicts come in
                round_.digest = StreamDigest(self._party.device) if header.verify else None
                if round_.staged is None:
                    self.path.prepare(round_.chunks, header, round_.digest, round_.landed())
                mark("receive: prepared")
            objections = self.agreement.collect(ticket).objections()
            if objections:
                raise ManifestMismatch("; ".join(objections))
        except BaseException:
            self.path.abandon()
            raise

    def _choose_landing(self, round_: _Round, sink: Sink) -> str | None:
        """Choose where the round lands; a loader round's staging plan too, so that a round too
        large for the staging bound is refused (the problem returned) before anyone agrees to it."""
        header, init = round_.header, self._party.init
        round_.landing = choose_landing(header.update_kind, header.manifest, sink, round_.layout,
                                        self._party.device, init.atomic, self._shadow)
        if round_.landing.staged:
            assert round_.loader is not None  # only a loader round stages
            try:
                round_.staged = self._staged_load(header, round_.layout, round_.chunks, round_.loader)
            except TransferError as error:
                return str(error)
        return None

    def _land(self, round_: _Round, sink: Sink, marks: list[tuple[str, float]]) -> Verdicts:
        """Receive the payload where the landing says (staged for a loader round), then exchange
        every party's verdict and checksum. Raises when anyone objects; the error's
        `weights_touched` says whether the live weights hold part of the round (unless it landed
        in a shadow copy or scratch)."""
        header, landing = round_.header, round_.landed()
        try:
            problem = None
            if round_.staged is not None:
                assert round_.loader is not None  # only a loader round stages
                problem = self._receive_staged(round_.staged, round_.chunks, header, round_.digest, round_.loader)
            else:
                self.path.receive_payload(round_.chunks, header, round_.digest, landing)
            marks.append(("enqueue", time.perf_counter()))
            if header.update_kind == "sparse_flat":
                assert landing.scratch is not None  # a sparse landing has its scratch
                problem = check_indices(header.manifest, landing.scratch, sink)
            outcome = self.agreement.exchange(problem, round_.digest)
            marks.append(("payload+agree", time.perf_counter()))
            bad_sums = outcome.checksum_mismatches()
            objections = outcome.objections() + outcome.checksum_failures()
            if objections:
                kind = IntegrityError if self._party.rank in bad_sums else TransferError
                raise kind("round not applied: " + "; ".join(objections))
        except TransferError as error:
            error.weights_touched = landing.touched()
            raise
        return outcome

    def refuse(self, reason: str) -> None:
        """Take part in the trainer's next round only to refuse it (this party refused its
        /update_weights body): receive the header, take part in what moves ahead of the agreement
        and drop it, post `reason`; every party then raises ManifestMismatch naming it, and the
        group stays in step for the next round. Nothing lands anywhere."""
        self._party.group.check_usable()
        self._object(self.headers.receive(), reason, loader_round=False)

    def _object(self, header: RoundHeader | UnknownHeader, problem: str, loader_round: bool) -> NoReturn:
        """Post `problem` as this receiver's verdict on `header`'s round, after taking part in the
        broadcasts that move ahead of the agreement; raises ManifestMismatch naming every objection."""
        if isinstance(header, UnknownHeader):
            lead = header.lead_pieces
        else:
            lead = self._rules.lead_pieces(self._chunking.of(self._stream_sizes_of(header), header)[1], header)
        self.path.lead(lead, None, None, loader_round)
        try:
            objections = self.agreement.collect(self.agreement.post(problem, gpu_done=False)).objections()
        finally:
            self.path.abandon()
        raise ManifestMismatch("; ".join(objections) or problem)

    def _stream_sizes_of(self, header: RoundHeader) -> tuple[int, ...]:
        """The header's stream sizes; cached while headers carry the same manifest object (a
        repeated header is reused, see `HeaderDecoder.decode`)."""
        cached = self._sizes
        if cached is None or cached.manifest is not header.manifest or cached.update_kind != header.update_kind:
            cached = self._sizes = _StreamSizes(header.manifest, header.update_kind,
                                                tuple(stream_sizes(header.update_kind, header.manifest)))
        return cached.sizes

    # -- a loader round: bounded staging ------------------------------------------------------
    def _staged_load(self, header: RoundHeader, layout: Layout, chunks: list[Chunk],
                     loader: LoaderSink) -> StagedLoad:
        """The staging plan of a loader round (TransferError naming the tensor and the bound when
        the round does not fit in packed_num_buffers x packed_buffer_size_bytes)."""
        init = self._party.init
        count = init.packed_num_buffers
        capacity = count * init.packed_buffer_size_bytes
        run_ends = loader.run_ends(header.manifest)
        piecewise = self._rules.is_direct(header)  # each tensor piece is its own broadcast: placed on its own
        key = (id(chunks), capacity, id(header.manifest), tuple(run_ends), piecewise)
        plan = self._staging_plans.get(key)
        if plan is None:
            if len(self._staging_plans) > 8:
                self._staging_plans.clear()
            plan = StagingPlan.build(layout, chunks, capacity, header.manifest.names, run_ends, piecewise)
            self._staging_plans[key] = plan
            plan.views["keep"] = (chunks, header.manifest)  # the key's ids stay valid
        area = self.staging.area(count)
        loader.staging_bytes = area.numel()
        return StagedLoad(plan, area, header.manifest, chunks, layout, header.verify)

    def _receive_staged(self, staged: StagedLoad, chunks: Sequence[Chunk], header: RoundHeader,
                        digest: StreamDigest | None, loader: LoaderSink) -> str | None:
        """Receive every chunk into its place in the staging area and hand each completed fused
        group to the loader while later chunks are still in flight; the loader's failure, if any."""
        path = self.path
        lead = path.lead_landed(staged) if chunks else None
        failure = staged.run(lambda number: path.post_chunk(staged, number, header),
                             lambda pending: pending.wait(), loader, digest, header.num_buffers,
                             path.side_programs(), first=lead)
        self._party.group.synchronize()
        return failure

    def _check_header(self, header: RoundHeader, store: Sink, info: UpdateInfo) -> str | None:
        if info.names:
            difference = info.difference(header.manifest)
            if difference is not None:
                return difference
        if info.update_kind is not None and info.update_kind != header.update_kind:
            return f"update_kind is {info.update_kind} here but {header.update_kind} from the trainer"
        want = info.packed_buffer_size_bytes or self._party.init.packed_buffer_size_bytes
        if header.buffer_size_bytes != want:
            return f"packed_buffer_size_bytes is {want} here but {header.buffer_size_bytes} from the trainer"
        if header.update_kind == "sparse_flat" or isinstance(store, LoaderSink):
            return sink_verdict(header.update_kind, header.manifest, store)
        checked = self._checked
        if checked is not None and checked.store is store and checked.manifest is header.manifest \
                and checked.size == len(store):
            return checked.verdict  # same store, same manifest object (cached header): same answer
        verdict = store.mismatch(header.manifest)
        self._checked = _StoreVerdict(store, header.manifest, len(store), verdict)
        return verdict

    def close(self) -> None:
        """Release the receiver's memory (after the group was closed)."""
        self.path.close()
        self.staging.clear()
        self._shadow.clear()
