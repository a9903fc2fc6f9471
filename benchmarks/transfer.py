"""GPU transfer benchmark: weightsync's nccl, ipc and p2p rounds against the hardware limit and
against vLLM's algorithm, with a Qwen2-7B-shaped bf16 parameter set, in ONE run.

    python benchmarks/transfer.py                 # all sections, every GPU this host has
    python benchmarks/transfer.py --gpus 2 --fanout 2,4,8 --reps 5

One process per role: the trainer on cuda:0, receiver k on cuda:k (k = 1..N-1) and, for ipc, a
second process on cuda:0. The coordinating process (this one, no CUDA) hosts a TCPStore the
workers use for barriers and results, drives the daemon HTTP section with the real coordinator,
and prints the table. Every measured transfer is checked bit-exact on the receiver against the
values the trainer generated for that repetition (fresh random bf16 data each time).

vLLM's algorithm is reimplemented here from its documentation (../shared/reference): packed
broadcast in `--buffer-size` chunks over `--buffers` streams with unpack + copy on receive, and
for IPC per-tensor handles rebuilt every round, then copied.

Loader rows (section `loader`): each transport lands the set through weightsync's LoaderSink into
a vLLM-shaped model (vllm_shaped.py: qkv and gate_up fused, preallocated, TP 1; its load_weights
copies each HF tensor into its slice), compared with the direct round and the limit of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO, REPO / "daemon", REPO / "operator", REPO / "benchmarks"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from weightsync.limits import parse_size  # noqa: E402

GiB = 1 << 30
TIMEOUT = 300.0  # every cross-process wait of the harness
# The nccl options (init_info.options) each diagnostic method runs with; the others run with the
# defaults. Paths are chosen only through options, never through the environment or a live
# transport's state.
NCCL_METHOD_OPTIONS: dict[str, dict] = {
    "ws_packed": {"packed": True},  # as if the tensors were not contiguous
    "ws_pack_full": {"pack_programs": None},
    "ws_pack128": {"pack_programs": 128},
    "ws_noramp": {"ramp": False},
    "ws_blocking": {"blocking": True},
    "ws_nccl_control": {"control": "communicator"},
}


# == the parameter set ==========================================================================
def qwen2_shapes(scale: float = 1.0) -> list[tuple[str, tuple[int, ...]]]:
    """Qwen2-7B: hidden 3584, intermediate 18944, 28 layers, vocab 152064, k/v 512 wide, q/k/v
    biases, untied lm_head. `scale` < 1 shrinks layers and vocabulary for a smoke run."""
    hidden, inter, kv = 3584, 18944, 512
    layers = max(1, round(28 * scale))
    vocab = max(1024, round(152064 * scale))
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.q_proj.bias", (hidden,)),
            (p + "self_attn.k_proj.weight", (kv, hidden)), (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def fill(tensors: list[torch.Tensor], tag: str) -> None:
    """Deterministic random values for the transfer named `tag` (the same on any GPU of this type)."""
    device = tensors[0].device
    gen = torch.Generator(device=device)
    base = zlib.crc32(tag.encode())
    for i, t in enumerate(tensors):
        gen.manual_seed(base * 1_000_003 + i)
        t.normal_(generator=gen)


def equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# == harness: store, barriers, results ==============================================================
class Harness:
    def __init__(self, port: int, rank: int | None, args):
        self.args = args
        self.rank = rank
        self.store = dist.TCPStore("127.0.0.1", port, is_master=rank is None,
                                   timeout=datetime.timedelta(seconds=TIMEOUT), wait_for_workers=False)

    def barrier(self, name: str, parties: int) -> None:
        if self.store.add(f"barrier/{name}", 1) == parties:
            self.store.set(f"barrier/{name}/go", b"1")
        self.store.wait([f"barrier/{name}/go"], datetime.timedelta(seconds=TIMEOUT))

    def put(self, key: str, value) -> None:
        self.store.set(key, json.dumps(value).encode())

    def get(self, key: str):
        return json.loads(self.store.get(key))

    def record(self, section: str, method: str, rep: int, rank: int | None = None, **values) -> None:
        self.put(f"res/{section}/{method}/{rep}/{self.rank if rank is None else rank}", values)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mem_begin(device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def mem_extra(device, before: int) -> int:
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# == vLLM's algorithm, reimplemented from its documentation ========================================
def vllm_nccl_send(tensors, comm, buffer_size: int, num_buffers: int) -> None:
    """Producer: per buffer slot a stream; pack tensors (concatenate) until the chunk passes the
    buffer size, broadcast it on that stream; reuse the slot once its stream is idle."""
    streams = [torch.cuda.Stream() for _ in range(num_buffers)]
    in_flight: list = [None] * num_buffers
    items = iter(tensors)
    slot = 0
    while True:
        streams[slot].synchronize()
        in_flight[slot] = None
        with torch.cuda.stream(streams[slot]):
            parts, size = [], 0
            for t in items:
                flat = t.contiguous().view(torch.uint8).view(-1)
                parts.append(flat)
                size += flat.numel()
                if size > buffer_size:
                    break
            if not parts:
                break
            packed = torch.cat(parts)
            comm.broadcast(packed.data_ptr(), packed.numel(), 0, streams[slot].cuda_stream)
            in_flight[slot] = packed
            slot = (slot + 1) % num_buffers
    for stream in streams:
        stream.synchronize()


def vllm_nccl_receive(specs, params, comm, buffer_size: int, num_buffers: int, device) -> None:
    """Consumer: the same chunking from the metadata; each chunk lands in a fresh tensor, is
    split into views and copied into the model's parameters (load_weights)."""
    streams = [torch.cuda.Stream() for _ in range(num_buffers)]
    items = iter(zip(specs, params, strict=True))
    slot = 0
    done = False
    while not done:
        streams[slot].synchronize()
        with torch.cuda.stream(streams[slot]):
            meta, size = [], 0
            while True:
                item = next(items, None)
                if item is None:
                    done = True
                    break
                (shape, dtype), param = item
                nbytes = math.prod(shape) * dtype.itemsize
                meta.append((shape, dtype, nbytes, param))
                size += nbytes
                if size > buffer_size:
                    break
            if not meta:
                break
            packed = torch.empty(size, dtype=torch.uint8, device=device)
            comm.broadcast(packed.data_ptr(), size, 0, streams[slot].cuda_stream)
            pieces = packed.split([m[2] for m in meta])
            for (shape, dtype, _, param), piece in zip(meta, pieces, strict=True):
                param.copy_(piece.view(dtype).view(shape))  # load_weights
            slot = (slot + 1) % num_buffers
    for stream in streams:
        stream.synchronize()


def vllm_ipc_handles(tensors) -> tuple[list[dict], list[torch.Tensor]]:
    """vLLM's unpacked IPC producer: per tensor, torch's reduce_tensor (new share every call)."""
    from torch.multiprocessing.reductions import reduce_tensor

    refs, out = [], []
    for t in tensors:
        w = t.detach().contiguous()
        refs.append(w)
        _, a = reduce_tensor(w)
        enc = lambda b: base64.b64encode(b).decode()  # noqa: E731
        out.append({"size": list(a[1]), "stride": list(a[2]), "offset": a[3], "dtype": str(a[5]).split(".")[-1],
                    "handle": enc(a[7]), "size_bytes": a[8], "offset_bytes": a[9], "rc": enc(a[11]),
                    "rc_offset": a[12], "event": enc(a[13]) if a[13] else "", "sync": bool(a[14])})
    return out, refs


def vllm_ipc_open(records: list[dict], device_index: int) -> list[torch.Tensor]:
    """vLLM's consumer: rebuild each tensor from its handle, device index rewritten."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    dec = base64.b64decode
    return [rebuild_cuda_tensor(torch.Tensor, torch.Size(r["size"]), tuple(r["stride"]), r["offset"],
                                torch.storage.TypedStorage, getattr(torch, r["dtype"]), device_index,
                                dec(r["handle"]), r["size_bytes"], r["offset_bytes"], False, dec(r["rc"]),
                                r["rc_offset"], dec(r["event"]) if r["event"] else b"", r["sync"])
            for r in records]


@dataclass(frozen=True)
class _NcclMethod:
    """One method's repetitions in an nccl section: its group's transport, the InitInfos its
    rounds run with (as joined, checksum off, the loader's buffers), the tensor the parties
    gather to start together, and the memory in use before the section (`mem_begin`)."""

    section: str
    method: str
    transport: Any
    init: Any
    verify_off: Any
    loader_init: Any
    tiny: torch.Tensor
    resident: int


@dataclass
class _Lending:
    """An ipc or p2p section as its methods run: this party's rank, the InitInfos its rounds run
    with (as joined, checksum off, the full checksum's group), the group's transport (None until
    the first weightsync round) and which options it was joined with, the trainer's flat buffer
    as the receiver opened it, and the memory in use before the first weightsync round."""

    backend: str
    rank: int
    init: Any
    verify_off: Any
    full_init: Any
    remote: torch.Tensor | None = None
    transport: Any = None
    setup: str = "default"
    resident: int = 0


class _Received(NamedTuple):
    """A receiver's repetition: when its copy began (None: timed from the trainer's start), when
    the bytes were here, the tensors that then hold them, and receive()'s own time."""

    began: float | None
    ended: float
    got: list[torch.Tensor]
    receive_ms: float | None = None


# == workers =========================================================================================
class Worker:
    """One process: builds its tensors, then follows the same script as every other worker."""

    def __init__(self, h: Harness, role: str, gpus: int):
        from weightsync.protocol import Manifest, TensorSpec
        from weightsync.store import WeightStore

        self.h, self.role, self.gpus, self.args = h, role, gpus, h.args
        self.index = 0 if role in ("trainer", "ipc") else int(role[4:])
        self.device = torch.device("cuda", self.index)
        torch.cuda.set_device(self.device)
        shapes = qwen2_shapes(self.args.scale)
        self.manifest = Manifest(tensors=tuple(TensorSpec(name=n, dtype="bfloat16", shape=s) for n, s in shapes))
        self.names = [n for n, _ in shapes]
        self.specs = [(s, torch.bfloat16) for _, s in shapes]
        if role == "trainer":  # separate tensors, as a model's parameters
            self.params = [torch.empty(s, dtype=torch.bfloat16, device=self.device) for _, s in shapes]
            self.flat_store = WeightStore.from_manifest(self.manifest, self.device)  # the flat baseline
            self.flat = self.flat_store._flat
        else:
            self.store = WeightStore.from_manifest(self.manifest, self.device)
            self.expected = WeightStore.from_manifest(self.manifest, self.device)
            self.mine = [self.store[n] for n in self.names]
            self.want = [self.expected[n] for n in self.names]
            if role != "ipc":  # the flat broadcast's (and the peer copy's) landing buffer
                self.flat_store = WeightStore.from_manifest(self.manifest, self.device)
                self.flat = self.flat_store._flat
            else:
                self.scratch = WeightStore.from_manifest(self.manifest, self.device)
            if "loader" in self.args.sections:  # an engine's parameters: qkv and gate_up fused
                from vllm_shaped import FusedModel
                from weightsync.landing import LoaderSink

                self.engine = FusedModel(shapes, torch.bfloat16, self.device)
                self.sink = LoaderSink(self.engine.load_weights, self.engine.check)
                self.loaded = [self.engine.slice(n) for n in self.names]
        self.nbytes = self.manifest.nbytes

    # -- per transfer: fresh values ----------------------------------------------------------------
    def next_values(self, tag: str) -> None:
        """The trainer's values for transfer `tag`; a receiver computes what it must then hold."""
        if self.role == "trainer":
            fill(self.params, tag)
            for name, t in zip(self.names, self.params, strict=True):
                self.flat_store[name].copy_(t)
        else:
            fill(self.want, tag)
        torch.cuda.synchronize(self.device)

    def check(self, got: list[torch.Tensor]) -> bool:
        torch.cuda.synchronize(self.device)
        return equal(got, self.want)

    def run(self) -> None:
        a = self.args
        parties = self.gpus + 1
        self.h.barrier("setup", parties)
        for n in a.fanout:
            if n <= self.gpus:
                self.nccl_section(n)
            self.h.barrier(f"nccl{n}/end", parties)
        if "http" in a.sections:
            self.http_section()
        self.h.barrier("http/end", parties)
        if "p2p" in a.sections and self.gpus >= 2:
            self.p2p_section()
        self.h.barrier("p2p/end", parties)
        if "ipc" in a.sections:
            self.ipc_section()
        self.h.barrier("ipc/end", parties)

    # -- nccl --------------------------------------------------------------------------------------
    def _init(self, backend: str, world: int, port: int, rank: int, **extra):
        from weightsync.protocol import InitInfo

        return InitInfo(backend=backend, master_address="127.0.0.1", master_port=port, world_size=world,
                        rank_offset=rank, packed_buffer_size_bytes=self.args.buffer_size,
                        packed_num_buffers=self.args.buffers, timeout_seconds=120, **extra)

    def nccl_section(self, n: int) -> None:
        from weightsync.transports.collective import trace

        rank = self.index if self.role != "ipc" else None
        if rank is None or rank >= n:
            return
        section = f"nccl{n}"
        a = self.args
        resident = mem_begin(self.device)  # the transport's own buffers count as its extra memory
        setup = "default"
        init, transport = self._nccl_join(section, n, rank, setup)
        tiny = torch.zeros(8, dtype=torch.uint8, device=self.device)
        try:
            for method in self._nccl_methods(n):
                if NCCL_METHOD_OPTIONS.get(method, {}) != NCCL_METHOD_OPTIONS.get(setup, {}):
                    transport.close()
                    setup = method
                    init, transport = self._nccl_join(section, n, rank, setup)
                run = _NcclMethod(section, method, transport, init, init.model_copy(update={"verify": False}),
                                  init.model_copy(update={"packed_buffer_size_bytes": a.loader_buffer_size,
                                                          "packed_num_buffers": a.loader_buffers}),
                                  tiny, resident)
                transport.init = run.loader_init if method == "ws_loader" else init
                for rep in range(a.warmup + a.reps):
                    self.next_values(f"{section}/{method}/{rep}")
                    transport.group.gather_to_host(tiny)  # start together
                    trace.TRACE = [] if "diag" in a.sections and method.startswith("ws") else None
                    t_zero = time.monotonic()
                    if rank == 0:
                        self._nccl_send(run, rep, t_zero)
                    else:
                        self._nccl_receive(run, rep, t_zero)
        finally:
            transport.close()

    def _nccl_join(self, section: str, n: int, rank: int, setup: str):
        """Every party joins a group of its own for each set of nccl options (they are agreed
        at init, so a method that needs other options needs another group)."""
        from weightsync.transports import get_transport

        init = self._init("nccl", n, self.h.get(f"port/{section}/{setup}"), rank,
                          options=NCCL_METHOD_OPTIONS.get(setup, {}), group_name=f"bench-{section}-{setup}")
        return init, get_transport("nccl").connect(init, rank, self.device)

    def _nccl_methods(self, n: int) -> list[str]:
        """The section's methods, the default group's first: each group is joined once."""
        a = self.args
        methods = ["flat", "ws", "ws_nosum", "ws_packed"] + (["vllm"] if "vllm" in a.sections else []) + \
            (["ws_loader"] if "loader" in a.sections and n == 2 else [])
        if n == 2 and "diag" in a.sections:
            methods += ["chunks_flat", "ws_pack_full", "ws_pack128", "ws_noramp", "ws_blocking", "ws_nccl_control"]
        methods.sort(key=lambda m: m in NCCL_METHOD_OPTIONS)
        return methods

    def _nccl_send(self, run: _NcclMethod, rep: int, t_zero: float) -> None:
        """The trainer's side of one repetition, timed from its start to the trainer's return."""
        a, group, method = self.args, run.transport.group, run.method
        began = time.perf_counter()
        if method == "flat":
            group.broadcast(self.flat).wait()
            group.gather_to_host(run.tiny)
        elif method == "chunks_flat":
            self._chunked_flat(group, run.tiny)
        elif method == "vllm":
            vllm_nccl_send(self.params, group.comm, a.buffer_size, a.buffers)
            group.gather_to_host(run.tiny)
        else:
            run.transport.init = run.verify_off if method == "ws_nosum" else \
                run.loader_init if method == "ws_loader" else run.init
            settled = dict(group.comm.stats)
            run.transport.send(list(zip(self.names, self.params, strict=True)))
        ms = (time.perf_counter() - began) * 1e3
        diag = _round_diagnosis(run.transport, group, settled, t_zero) if method.startswith("ws") else {}
        self.h.record(run.section, method, rep, ms=ms, **diag)

    def _nccl_receive(self, run: _NcclMethod, rep: int, t_zero: float) -> None:
        """A receiver's side of one repetition: what it holds then is checked bit-exact, and its
        extra memory recorded (a weightsync round's counts the transport's own buffers)."""
        from weightsync.protocol import UpdateInfo

        a, group, method = self.args, run.transport.group, run.method
        before = mem_begin(self.device)
        if method in ("flat", "chunks_flat"):
            if method == "flat":
                group.broadcast(self.flat).wait()
                group.gather_to_host(run.tiny)
            else:
                self._chunked_flat(group, run.tiny)
            got = [self.flat_store[nm] for nm in self.names]
        elif method == "vllm":
            vllm_nccl_receive(self.specs, self.mine, group.comm, a.buffer_size, a.buffers, self.device)
            group.gather_to_host(run.tiny)
            got = self.mine
        elif method == "ws_loader":
            settled = dict(group.comm.stats)
            run.transport.receive(self.sink, UpdateInfo())
            got = self.loaded
        else:
            settled = dict(group.comm.stats)
            stats = run.transport.receive(self.store, UpdateInfo())
            got = self.mine
            assert stats.in_place
        extra = mem_extra(self.device, run.resident if method.startswith("ws") else before)
        diag = _round_diagnosis(run.transport, group, settled, t_zero) if method.startswith("ws") else {}
        self.h.record(run.section, method, rep, ok=self.check(got), mem=extra, **diag)

    def _chunked_flat(self, group, tiny) -> None:
        """(diag) The flat buffer in the round's chunk sizes, nothing packed: the chunks' own cost."""
        from weightsync.layout import Layout

        group.stream.wait_stream(torch.cuda.current_stream(self.device))
        for chunk in Layout.of_manifest(self.manifest).chunks(self.args.buffer_size, ramp=True):
            group.broadcast_on_stream(self.flat[chunk.start : chunk.stop])
        group.synchronize()
        group.gather_to_host(tiny)

    # -- daemon HTTP API ---------------------------------------------------------------------------
    def http_section(self) -> None:
        """Trainer agent and receiver daemon served over HTTP in these processes; the
        coordinating process drives rounds with the real coordinator."""
        if self.role not in ("trainer", "recv1") or self.gpus < 2:
            return
        from weightsync_daemon.server import serve_embedded
        from weightsync_daemon.service import ReceiverService, SenderService

        if self.role == "trainer":
            service = SenderService(source=lambda: list(zip(self.names, self.params, strict=True)), backend="nccl",
                                    device=self.device)
        else:
            service = ReceiverService(store=self.store, backend="nccl", device=self.device)
        server = serve_embedded(service)
        self.h.put(f"http/url/{self.role}", server.url)
        try:
            for rep in range(self.args.warmup + self.args.reps):
                self.h.store.wait([f"http/go/{rep}"], datetime.timedelta(seconds=TIMEOUT))
                self.next_values(f"http/{rep}")
                self.h.barrier(f"http/ready/{rep}", 3)
                self.h.store.wait([f"http/done/{rep}"], datetime.timedelta(seconds=TIMEOUT))
                if self.role == "recv1":
                    self.h.record("http", "ws_http", rep, ok=self.check(self.mine))
                self.h.barrier(f"http/checked/{rep}", 3)
        finally:
            server.stop()

    # -- p2p and ipc ---------------------------------------------------------------------------------
    def p2p_section(self) -> None:
        if self.role not in ("trainer", "recv1"):
            return
        self._lend_section("p2p", "recv1")

    def ipc_section(self) -> None:
        if self.role not in ("trainer", "ipc"):
            return
        self._lend_section("ipc", "ipc")

    def _lend_section(self, backend: str, receiver: str) -> None:
        a, h = self.args, self.h
        lending = self._lending(backend)
        try:
            for method in self._lend_methods(backend):
                self._lend_group(lending, method)
                for rep in range(1 if method == "ws_first" else a.warmup + a.reps):
                    key = f"{backend}/{method}/{rep}"
                    self.next_values(key)
                    h.barrier(key + "/go", 2)
                    if lending.rank == 0:
                        self._lend_send(lending, method, key)
                    else:
                        self._lend_receive(lending, method, rep, key)
            if lending.rank == 1 and backend == "ipc" and "diag" in a.sections:
                self.tune_kernel()
        finally:
            if lending.transport is not None:
                lending.transport.close()

    def _lending(self, backend: str) -> _Lending:
        """This party's part of an ipc or p2p section before its first round: the InitInfos its
        groups join with, and the trainer's flat buffer, lent once (the limit's source) and
        opened by the receiver."""
        from weightsync.transports.cuda_ipc import StorageHandle, export_storage, open_storage

        h = self.h
        trainer = self.role == "trainer"
        rank = 0 if trainer else 1
        init = self._init(backend, 2, h.get(f"port/{backend}"), rank)
        verify_off = init.model_copy(update={"verify": False})
        # ipc's full checksum (not a sample) is an option, agreed at init: a group of its own.
        full_init = self._init(backend, 2, h.get(f"port/{backend}/full"), rank, options={"verify": "full"},
                               group_name=f"bench-{backend}-full")
        lending = _Lending(backend, rank, init, verify_off, full_init)
        if trainer:  # the limit's source: one flat buffer, lent once
            h.put(f"{backend}/flat", export_storage(self.flat.untyped_storage()).model_dump(mode="json"))
        h.barrier(f"{backend}/flat", 2)
        if not trainer:
            remote = open_storage(StorageHandle(**h.get(f"{backend}/flat")), self.index)
            lending.remote = remote[: self.flat.numel()] if backend == "p2p" else remote[: self.scratch._flat.numel()]
        return lending

    def _lend_methods(self, backend: str) -> list[str]:
        a = self.args
        return ["limit"] + (["vllm"] if backend == "ipc" and "vllm" in a.sections else []) + \
            ["ws_first", "ws", "ws_nosum"] + (["ws_full"] if backend == "ipc" else []) + \
            (["ws_loader"] if "loader" in a.sections else [])

    def _lend_group(self, lending: _Lending, method: str) -> None:
        """The group `method`'s rounds run in: joined at the first weightsync round (the
        transport's own buffers count in its memory from there); ws_full's full checksum is an
        option agreed at init, so it runs in a group of its own, and ws_loader, back on the
        defaults, in a fresh one."""
        from weightsync.transports import get_transport

        if method == "ws_first":
            lending.resident = mem_begin(self.device)
            lending.transport = get_transport(lending.backend).connect(lending.init, lending.rank, self.device)
            lending.setup = "default"
        elif lending.transport is not None and ("full" if method == "ws_full" else "default") != lending.setup:
            lending.transport.close()
            if method == "ws_full":
                lending.setup, lending.init = "full", lending.full_init
            else:
                lending.setup, lending.init = "default", lending.init.model_copy(update={
                    "options": {}, "group_name": f"bench-{lending.backend}-loader",
                    "master_port": self.h.get(f"port/{lending.backend}/loader")})
            lending.transport = get_transport(lending.backend).connect(lending.init, lending.rank, self.device)
            lending.verify_off = lending.init.model_copy(update={"verify": False})

    def _lend_send(self, lending: _Lending, method: str, key: str) -> None:
        """The trainer's side of one repetition: lend the set (vLLM's handles, or a weightsync
        round's update_info, for the harness to relay), then hold it until the receiver is done."""
        h, transport = self.h, lending.transport
        began = time.monotonic()
        refs = None
        if method == "vllm":
            records, refs = vllm_ipc_handles(self.params)
            h.put(key + "/info", records)
        elif method.startswith("ws"):
            transport.init = lending.verify_off if method == "ws_nosum" else lending.init
            transport.begin_round()
            stats = transport.send(list(zip(self.names, self.params, strict=True)))
            assert not stats.more
            h.put(key + "/send_ms", stats.seconds * 1e3)
            h.put(key + "/info", stats.update_info)
        h.put(key + "/began", began)
        h.barrier(key + "/received", 2)
        if refs is not None:
            del refs
            torch.cuda.ipc_collect()
        if transport is not None:
            transport.end_round()

    def _lend_receive(self, lending: _Lending, method: str, rep: int, key: str) -> None:
        """The receiver's side of one repetition, timed from the trainer's start (the limit: from
        its own copy's) to the bytes being here; checked bit-exact, with its extra memory."""
        h = self.h
        before = mem_begin(self.device)
        received = self._lend_land(lending, method, key)
        extra = mem_extra(self.device, lending.resident if method.startswith("ws") else before)
        began = received.began if method == "limit" else h.get(key + "/began")
        h.barrier(key + "/received", 2)
        engine = {}
        if method.startswith("ws"):
            engine = {"receive_ms": received.receive_ms,
                      "engine_ms": h.get(key + "/send_ms") + received.receive_ms}
        h.record(lending.backend, method, rep, rank=1, ms=(received.ended - began) * 1e3,
                 ok=self.check(received.got), mem=extra, **engine)

    def _lend_land(self, lending: _Lending, method: str, key: str) -> _Received:
        """Take the lent bytes the method's way: one copy of the flat buffer (the limit), vLLM's
        per-tensor handles opened and copied, or a weightsync round (into the store or the loader)."""
        from weightsync.protocol import UpdateInfo

        h = self.h
        if method == "limit":
            target = self.flat if lending.backend == "p2p" else self.scratch._flat
            h.get(key + "/began")
            began = time.monotonic()
            target.copy_(lending.remote)
            torch.cuda.synchronize(self.device)
            ended = time.monotonic()
            got = [(self.flat_store if lending.backend == "p2p" else self.scratch)[nm] for nm in self.names]
            return _Received(began, ended, got)
        if method == "vllm":
            records = h.get(key + "/info")
            tensors = vllm_ipc_open(records, self.index)
            for param, t in zip(self.mine, tensors, strict=True):
                param.copy_(t)
            torch.cuda.synchronize(self.device)
            ended = time.monotonic()
            del tensors
            return _Received(None, ended, self.mine)
        info = UpdateInfo(**h.get(key + "/info"))
        loading = method == "ws_loader"
        stats = lending.transport.receive(self.sink if loading else self.store, info)
        ended = time.monotonic()
        return _Received(None, ended, self.loaded if loading else self.mine, stats.seconds * 1e3)

    def tune_kernel(self) -> None:
        """(diag) The batched copy kernel's block size and warps, against per-tensor cudaMemcpy,
        copying this process's 15 GB set once more on its GPU."""
        from weightsync import kernels
        from weightsync.integrity import StreamDigest
        from weightsync.layout import Layout
        from weightsync.packing import Region, RegionPlan

        srcs = [self.store[n].view(-1).view(torch.uint8) for n in self.names]
        dsts = [self.scratch[n].view(-1).view(torch.uint8) for n in self.names]
        offsets = Layout.of_sizes([s.numel() for s in srcs]).offsets

        def timed(fn) -> float:
            fn()
            torch.cuda.synchronize(self.device)
            runs = []
            for _ in range(3):
                began = time.perf_counter()
                fn()
                torch.cuda.synchronize(self.device)
                runs.append((time.perf_counter() - began) * 1e3)
            return round(statistics.median(runs), 3)

        out = {"memcpy per tensor": timed(lambda: [d.copy_(s) for s, d in zip(srcs, dsts, strict=True)])}
        defaults = kernels.BLOCK_WORDS, kernels.NUM_WARPS
        try:
            for block, warps in ((4096, 4), (8192, 8), (16384, 8), (16384, 16), (32768, 16)):
                kernels.BLOCK_WORDS, kernels.NUM_WARPS = block, warps
                for verify in (False, True):
                    plan = RegionPlan([Region(s, d, o) for s, d, o in zip(srcs, dsts, offsets, strict=True)], copy=True,
                                      digest=verify)
                    out[f"kernel {block}w/{warps}warps {'copy+sum' if verify else 'copy'}"] = timed(
                        lambda plan=plan, verify=verify: plan.run(StreamDigest(self.device) if verify else None))
        finally:
            kernels.BLOCK_WORDS, kernels.NUM_WARPS = defaults
        self.h.put("diag/kernel", out)


def _round_diagnosis(transport, group, settled: dict, t_zero: float) -> dict:
    """What one weightsync round spent where: its phases, NCCL calls still settling, the step trace."""
    stats = group.comm.stats
    marks = getattr(transport, "gpu_trace", [])
    if marks:
        marks[-1][1].synchronize()
        transport.timings = {**transport.timings, **{
            f"gpu {label}": marks[0][1].elapsed_time(event) / 1e3 for label, event in marks[1:]}}
    return {"phases": transport.timings, "in_progress": stats["in_progress"] - settled["in_progress"],
            "settle_ms": (stats["settle_seconds"] - settled["settle_seconds"]) * 1e3, "trace": _trace(t_zero)}


def _trace(t_zero: float) -> list:
    """The round's recorded steps as (label, ms since the shared start), then stop recording."""
    from weightsync.transports.collective import trace

    steps = [(label, round((at - t_zero) * 1e3, 3)) for label, at in (trace.TRACE or [])]
    trace.TRACE = None
    return steps


# == the coordinating process ===========================================================================
def drive_http(h: Harness, args) -> None:
    from weightsync_operator.client import Endpoint
    from weightsync_operator.coordinator import Coordinator, SyncSpec, Timeouts

    urls = {role: h.get(f"http/url/{role}") for role in ("trainer", "recv1")}
    spec = SyncSpec(backend="nccl", master_port=free_port(), packed_buffer_size_bytes=args.buffer_size,
                    packed_num_buffers=args.buffers, pause_mode="none", transfer_timeout=120,
                    timeouts=Timeouts(init=120, update=300))

    async def rounds():
        async with Coordinator(Endpoint("trainer", urls["trainer"]), [Endpoint("recv1", urls["recv1"])],
                               spec) as coordinator:
            await coordinator.init()
            for rep in range(args.warmup + args.reps):
                h.store.set(f"http/go/{rep}", b"1")
                h.barrier(f"http/ready/{rep}", 3)
                result = await coordinator.sync(rep + 1)
                if not result.ok:
                    raise RuntimeError(f"HTTP round failed: {result.reason}")
                h.put(f"res/http/ws_http/{rep}/0", {"ms": result.transfer_seconds * 1e3,
                                                     "total_ms": result.total_seconds * 1e3})
                h.store.set(f"http/done/{rep}", b"1")
                h.barrier(f"http/checked/{rep}", 3)

    asyncio.run(rounds())


def collect(h: Harness, section: str, method: str, ranks: list[int], args) -> dict | None:
    reps = range(args.warmup, args.warmup + args.reps) if not method.endswith("first") else range(1)
    ms, ok, mem, receive, engine, diag = [], True, 0, [], [], {}
    for rep in reps:
        for rank in ranks:
            key = f"res/{section}/{method}/{rep}/{rank}"
            if not h.store.check([key]):
                return None
            value = h.get(key)
            if "ms" in value:
                ms.append(value["ms"])
            if value.get("receive_ms") is not None:
                receive.append(value["receive_ms"])
            if value.get("engine_ms") is not None:
                engine.append(value["engine_ms"])
            if "trace" in value:
                diag[f"trace{rank}"] = value["trace"]
            if "phases" in value:
                diag[rank] = {k: round(v * 1e3, 2) for k, v in value["phases"].items()}
                diag[rank]["in_progress"] = value["in_progress"]
                diag[rank]["settle_ms"] = round(value["settle_ms"], 2)
            ok = ok and value.get("ok", True)
            mem = max(mem, value.get("mem", 0))
    return {"ms": statistics.median(ms), "ok": ok, "mem": mem, "spread": (min(ms), max(ms)),
            "receive_ms": statistics.median(receive) if receive else None,
            "engine_ms": statistics.median(engine) if engine else None, "diag": diag}


@dataclass
class _Table:
    """The printed table as it is built: its lines, the set's size in GB (for the GB/s column),
    the results the targets read (`targets`), and the diagnosis lines printed after it."""

    gb: float
    lines: list[str] = field(default_factory=list)
    results: dict = field(default_factory=dict)
    diags: list[str] = field(default_factory=list)

    def row(self, section: str, label: str, res: dict | None, limit_ms: float | None, extra: str = "") -> None:
        """One measured path: its median, throughput, ratio to the run's limit, bit-exactness and
        the receiver's extra memory; `not run` when it has no results."""
        if res is None:
            self.lines.append(f"{section:<6} {label:<52} {'not run':>9}")
            return
        ratio = res["ms"] / limit_ms if limit_ms else float("nan")
        mem = f"{res['mem'] / GiB:6.2f}" if res["mem"] else "     -"
        if res.get("receive_ms") is not None and not extra:
            extra = f"(receive() alone {res['receive_ms']:.2f} ms)"
        self.lines.append(f"{section:<6} {label:<52} {res['ms']:9.2f} {self.gb / res['ms'] * 1e3:8.1f} {ratio:8.3f}x "
                          f"{'yes' if res['ok'] else 'NO':>9} {mem:>9} {extra}")


def table(h: Harness, args, gpus: int, nbytes: int, count: int) -> str:
    t = _Table(nbytes / 1e9)
    head = (f"{'':<6} {'path':<52} {'ms':>9} {'GB/s':>8} {'vs limit':>9} {'bit-exact':>9} {'recv GiB':>9}")
    t.lines += [head, "-" * len(head)]
    if 2 in args.fanout and gpus >= 2:
        _nccl_rows(t, h, args)
    if "ipc" in args.sections:
        _ipc_rows(t, h, args)
    if "p2p" in args.sections and gpus >= 2:
        _p2p_rows(t, h, args)
    t.lines.append("")
    _fanout_lines(t, h, args, gpus)
    t.lines.append("")
    t.lines.append(targets(t.results, args))
    if "diag" in args.sections and h.store.check(["diag/kernel"]):
        t.diags.append(f"  ipc copy kernel ms: {h.get('diag/kernel')}")
    if t.diags:
        t.lines += ["", "diagnosis:", *t.diags]
    return "\n".join(t.lines)


def _nccl_rows(t: _Table, h: Harness, args) -> None:
    """The nccl rows (one trainer GPU, one receiver GPU): the flat broadcast is the limit."""
    pair = [0, 1]
    flat = collect(h, "nccl2", "flat", pair, args)
    t.results["flat"] = flat
    base = flat["ms"] if flat else None
    t.row("nccl", "flat broadcast of the same bytes (limit)", flat, base)
    vllm = collect(h, "nccl2", "vllm", pair, args) if "vllm" in args.sections else None
    t.results["vllm"] = vllm
    t.row("nccl", "vLLM packed algorithm (baseline)", vllm, base)
    ws = collect(h, "nccl2", "ws", pair, args)
    t.results["ws"] = ws
    t.row("nccl", "weightsync round, engine API", ws, base,
          f"{vllm['ms'] / ws['ms']:.2f}x faster than vLLM" if ws and vllm else "")
    t.row("nccl", "weightsync round, engine API, checksum off", collect(h, "nccl2", "ws_nosum", pair, args), base)
    t.row("nccl", "weightsync round, packed (as for non-contiguous tensors)",
          collect(h, "nccl2", "ws_packed", pair, args), base)
    if "diag" in args.sections:
        _nccl_diag_rows(t, h, args, base)
    if "loader" in args.sections:
        loader = collect(h, "nccl2", "ws_loader", pair, args)
        t.results["nccl_loader"] = loader
        t.row("nccl", "weightsync round into a vLLM-shaped loader", loader, base,
              f"{loader['ms'] / ws['ms']:.3f}x the round above; staging "
              f"{args.loader_buffer_size / GiB:g} GiB x {args.loader_buffers}" if loader and ws else "")
    if "http" in args.sections:
        http = collect(h, "http", "ws_http", pair, args)
        t.results["http"] = http
        t.row("nccl", "weightsync round via daemon HTTP (update step)", http, base)


# The nccl diagnosis rows: the method, and what it changes.
_NCCL_DIAG_ROWS = (
    ("chunks_flat", "(diag) flat buffer in the round's chunks, no packing"),
    ("ws_pack_full", "(diag) weightsync round, one program per block"),
    ("ws_pack128", "(diag) weightsync round, packing on 128 programs"),
    ("ws_noramp", "(diag) weightsync round, chunks not ramped"),
    ("ws_blocking", "(diag) weightsync round, blocking communicator"),
    ("ws_nccl_control", "(diag) weightsync round, control steps over NCCL"),
)


def _nccl_diag_rows(t: _Table, h: Harness, args, base: float | None) -> None:
    """(diag) The nccl variants' rows, then each round's phases (and the default round's step
    trace) for the diagnosis."""
    for method, label in _NCCL_DIAG_ROWS:
        t.row("nccl", label, collect(h, "nccl2", method, [0, 1], args), base)
    for name in ("ws", "ws_nosum", "ws_noramp", "ws_blocking", "ws_nccl_control"):
        res = collect(h, "nccl2", name, [0, 1], args)
        if not res:
            continue
        phases = {k: v for k, v in res["diag"].items() if not str(k).startswith("trace")}
        t.diags.append(f"  nccl {name}: last rep phases ms (trainer, receiver): {phases}")
        if name == "ws":
            for k in ("trace0", "trace1"):
                t.diags.append(f"  nccl ws {k} (step, ms since the start): {res['diag'].get(k)}")


def _ipc_rows(t: _Table, h: Harness, args) -> None:
    """The ipc rows (trainer and receiver on one GPU): one device copy of the set is the limit."""
    limit = collect(h, "ipc", "limit", [1], args)
    t.results["ipc_limit"] = limit
    base = limit["ms"] if limit else None
    t.row("ipc", "one device-to-device copy of the set (limit)", limit, base)
    t.row("ipc", "vLLM: per-tensor handles opened every round + copy", collect(h, "ipc", "vllm", [1], args), base)
    t.row("ipc", "weightsync first round (opens the handles)", collect(h, "ipc", "ws_first", [1], args), base)
    rep_ = collect(h, "ipc", "ws", [1], args)
    t.results["ipc"] = _engine(rep_)
    t.row("ipc", "weightsync repeat round, engine API (send + receive)", _engine(rep_), base)
    t.row("ipc", "weightsync repeat round, engine API, checksum off",
          _engine(collect(h, "ipc", "ws_nosum", [1], args)), base)
    t.row("ipc", "weightsync repeat round, engine API, every byte checksummed",
          _engine(collect(h, "ipc", "ws_full", [1], args)), base)
    t.row("ipc", "weightsync repeat round incl. the harness relay", rep_, base)
    if "loader" in args.sections:
        loader = _engine(collect(h, "ipc", "ws_loader", [1], args))
        t.results["ipc_loader"] = loader
        t.row("ipc", "weightsync round into a vLLM-shaped loader (send + receive)", loader, base,
              f"{loader['ms'] / t.results['ipc']['ms']:.3f}x the repeat round" if loader and t.results["ipc"] else "")


def _p2p_rows(t: _Table, h: Harness, args) -> None:
    """The p2p rows (trainer and receiver on two GPUs): one peer copy of the set is the limit."""
    limit = collect(h, "p2p", "limit", [1], args)
    t.results["p2p_limit"] = limit
    base = limit["ms"] if limit else None
    t.row("p2p", "one peer copy of the same bytes (limit)", limit, base)
    ws = collect(h, "p2p", "ws", [1], args)
    t.results["p2p"] = _engine(ws)
    flat = t.results.get("flat")
    t.row("p2p", "weightsync round, engine API (send + receive)", _engine(ws), base,
          f"{_engine(ws)['ms'] / flat['ms']:.3f}x the flat NCCL broadcast" if ws and flat else "")
    t.row("p2p", "weightsync round, engine API, checksum off", _engine(collect(h, "p2p", "ws_nosum", [1], args)), base)
    if "loader" in args.sections:
        loader = _engine(collect(h, "p2p", "ws_loader", [1], args))
        t.results["p2p_loader"] = loader
        t.row("p2p", "weightsync round into a vLLM-shaped loader (send + receive)", loader, base,
              f"{loader['ms'] / t.results['p2p']['ms']:.3f}x the round above" if loader and t.results["p2p"] else "")
    t.row("p2p", "weightsync round incl. the harness relay", ws, base)
    t.row("p2p", "weightsync first round (opens the handles)", collect(h, "p2p", "ws_first", [1], args), base)


def _fanout_lines(t: _Table, h: Harness, args, gpus: int) -> None:
    """The fan-out table: one trainer GPU to N-1 receivers, weightsync against the flat broadcast."""
    t.lines.append(f"fan-out: one trainer GPU -> N-1 receiver GPUs (lent here: {gpus} GPUs)")
    t.lines.append(f"{'N':>3} {'flat bcast ms':>14} {'weightsync ms':>14} {'ratio':>7} {'growth from N=2':>16}")
    first = None
    for n in args.fanout:
        if n > gpus:
            t.lines.append(f"{n:>3} {'not run: needs ' + str(n) + ' GPUs':>38}")
            continue
        flat = collect(h, f"nccl{n}", "flat", list(range(n)), args)
        ws = collect(h, f"nccl{n}", "ws", list(range(n)), args)
        if not flat or not ws:
            t.lines.append(f"{n:>3} {'not run':>14}")
            continue
        first = first or ws["ms"]
        ok = "" if flat["ok"] and ws["ok"] else "  NOT bit-exact"
        t.lines.append(f"{n:>3} {flat['ms']:14.2f} {ws['ms']:14.2f} {ws['ms'] / flat['ms']:7.3f} "
                       f"{(ws['ms'] / first - 1) * 100:15.1f}%{ok}")


def _engine(res: dict | None) -> dict | None:
    """A lend (ipc/p2p) result timed as the library's own work: the trainer's send() plus the
    receiver's receive(), without the harness passing update_info between the processes."""
    if res is None or res.get("engine_ms") is None:
        return res
    return {**res, "ms": res["engine_ms"], "receive_ms": res["receive_ms"]}


class _Target(NamedTuple):
    """A target the run is held to: `result`'s median over `baseline`'s at most `limit`."""

    name: str
    result: str
    baseline: str
    limit: float


_TARGETS = (
    _Target("nccl round / flat broadcast", "ws", "flat", 1.03),
    _Target("nccl round / vLLM algorithm", "ws", "vllm", 1.0),
    _Target("ipc repeat round / one device copy", "ipc", "ipc_limit", 1.15),
    _Target("p2p round / one peer copy", "p2p", "p2p_limit", 1.05),
    _Target("nccl loader round / direct round", "nccl_loader", "ws", 1.05),
    _Target("p2p loader round / direct round", "p2p_loader", "p2p", 1.05),
    _Target("ipc loader round / one device copy", "ipc_loader", "ipc_limit", 1.3),
)


def _verdict(name: str, value: float, limit: float) -> str:
    mark = "met" if value <= limit else f"MISSED by {(value / limit - 1) * 100:.1f}%"
    return f"  {name}: {value:.3f} (target <= {limit}) {mark}"


def targets(r: dict, args) -> str:
    out = ["targets:"]
    for target in _TARGETS:
        if r.get(target.result) and r.get(target.baseline):
            out.append(_verdict(target.name, r[target.result]["ms"] / r[target.baseline]["ms"], target.limit))
    mems = [v["mem"] for k, v in r.items() if v and k in ("ws", "p2p", "ipc")]
    if mems:
        out.append(_verdict("receiver extra GPU memory / buffer size", max(mems) / args.buffer_size, 2.0))
    everything = [v for v in r.values() if v]
    out.append(f"  every result bit-exact: {'yes' if all(v['ok'] for v in everything) else 'NO'}")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    parser.add_argument("--fanout", default="2,4,8", help="receiver fan-out sizes N (GPUs incl. the trainer's)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--buffer-size", type=parse_size, default=GiB, help="packed buffer size (1GiB, 256MiB, bytes)")
    parser.add_argument("--buffers", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the model (smoke runs)")
    parser.add_argument("--sections", default="vllm,http,p2p,ipc,loader",
                        help="vllm, http, p2p, ipc, loader (rows landing through a vLLM-shaped loader), diag")
    parser.add_argument("--loader-buffer-size", type=parse_size, default=512 << 20,
                        help="nccl loader rows: the packed buffer size (the loader stages in it)")
    parser.add_argument("--loader-buffers", type=int, default=4, help="nccl loader rows: packed buffers")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.fanout = sorted({int(n) for n in args.fanout.split(",") if n})
    args.sections = set(args.sections.split(",")) if args.sections else set()
    if args.worker:
        h = Harness(args.port, _rank(args.worker), args)
        try:
            Worker(h, args.worker, args.gpus).run()
        except BaseException:
            h.store.set(f"error/{args.worker}", traceback.format_exc().encode())
            raise
        return 0
    return coordinate(args)


def _rank(role: str) -> int:
    return {"trainer": 0, "ipc": 99}.get(role, int(role[4:]) if role.startswith("recv") else -1)


def coordinate(args) -> int:
    gpus = args.gpus or torch.cuda.device_count()
    if gpus < 1:
        print("needs at least one CUDA GPU", file=sys.stderr)
        return 2
    args.gpus = gpus
    port = free_port()
    h = Harness(port, None, args)
    _share_ports(h, args)
    roles = ["trainer"] + [f"recv{k}" for k in range(1, gpus)] + ["ipc"]
    argv = _worker_argv(args, port, gpus)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    workers = {role: subprocess.Popen(argv + ["--worker", role], env=env) for role in roles}
    failed = _supervise(workers, h, args, gpus)
    from weightsync.protocol import Manifest, TensorSpec

    shapes = qwen2_shapes(args.scale)
    manifest = Manifest(tensors=tuple(TensorSpec(name=n, dtype="bfloat16", shape=s) for n, s in shapes))
    print(_title(args, gpus, len(shapes), manifest.nbytes))
    print(table(h, args, gpus, manifest.nbytes, len(shapes)))
    if failed:
        print(f"\nINCOMPLETE: {failed}")
    return 1 if failed else 0


def _share_ports(h: Harness, args) -> None:
    """A rendezvous port for every group the workers join: each nccl fan-out and option set, and
    ipc's and p2p's groups (default, full checksum, loader)."""
    for n in args.fanout:
        for setup in ("default", *NCCL_METHOD_OPTIONS):
            h.put(f"port/nccl{n}/{setup}", free_port())
    for backend in ("p2p", "ipc"):
        for suffix in ("", "/full", "/loader"):
            h.put(f"port/{backend}{suffix}", free_port())


def _worker_argv(args, port: int, gpus: int) -> list[str]:
    """This script's command line for a worker (its role appended), with this run's settings."""
    return [sys.executable, str(Path(__file__).resolve()), "--port", str(port), "--gpus", str(gpus),
            "--fanout", ",".join(map(str, args.fanout)), "--reps", str(args.reps), "--warmup", str(args.warmup),
            "--buffer-size", str(args.buffer_size), "--buffers", str(args.buffers), "--scale", str(args.scale),
            "--loader-buffer-size", str(args.loader_buffer_size), "--loader-buffers", str(args.loader_buffers),
            "--sections", ",".join(sorted(args.sections))]


def _supervise(workers: dict[str, subprocess.Popen], h: Harness, args, gpus: int) -> str | None:
    """Drive the HTTP section (once both its servers are up), then wait for every worker to end;
    why the run failed (printed as it happens), None if it did not. Workers still running then
    are killed, so that the table prints what was measured."""
    began = time.monotonic()
    failed = None
    try:
        if "http" in args.sections and gpus >= 2:
            _wait(workers, h, lambda: not h.store.check(["http/url/trainer", "http/url/recv1"]))
            drive_http(h, args)
        _wait(workers, h, lambda: any(w.poll() is None for w in workers.values()), began)
        failed = _dead(workers, h)
        if failed:
            raise RuntimeError(failed)
    except Exception as error:  # noqa: BLE001 - report, print what was measured
        print(f"benchmark failed: {error}", file=sys.stderr)
        failed = str(error)
    finally:
        for w in workers.values():
            if w.poll() is None:
                w.kill()
    return failed


def _wait(workers: dict[str, subprocess.Popen], h: Harness, waiting, began: float | None = None) -> None:
    """Poll while `waiting()`; RuntimeError once a worker died (or, from `began`, after 3 hours)."""
    while waiting():
        failed = _dead(workers, h)
        if failed:
            raise RuntimeError(failed)
        if began is not None and time.monotonic() - began > 3 * 3600:
            raise RuntimeError("the benchmark ran for 3 hours")
        time.sleep(0.2)


def _title(args, gpus: int, count: int, nbytes: int) -> str:
    """The run's heading: the set, the GPUs, torch and NCCL, the buffers and repetitions."""
    name = torch.cuda.get_device_name(0)
    from weightsync.transports.nccl_lib import version as nccl_version

    v = nccl_version()
    return (f"\nweightsync transfer benchmark: Qwen2-7B-shaped bf16 set, {count} tensors, "
            f"{nbytes / 1e9:.2f} GB; {gpus} x {name}; torch {torch.__version__}, NCCL "
            f"{v // 10000}.{v // 100 % 100}.{v % 100}; buffer {args.buffer_size / GiB:g} GiB x {args.buffers}; "
            f"median of {args.reps} after {args.warmup} warm-up")


def _dead(workers, h) -> str | None:
    for role, w in workers.items():
        code = w.poll()
        if code not in (None, 0):
            detail = h.store.get(f"error/{role}").decode() if h.store.check([f"error/{role}"]) else ""
            return f"worker {role} exited with {code}\n{detail}"
    return None


if __name__ == "__main__":
    sys.exit(main())
