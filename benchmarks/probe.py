"""Diagnosis probe (device machine, 2 GPUs): what the pieces of a round cost on this hardware.

Not the benchmark (that is `transfer.py`); this measures the building blocks a transport is
made of, each as a ratio to the one-call limit of the same run, to decide how to build it:

  nccl   one broadcast of the set vs the same bytes in k calls, in one NCCL group, per tensor
  store  one control round trip over the rendezvous TCPStore between the two processes
  local  copy / checksum passes over the set on one GPU (the ipc building blocks)
  peer   peer copies cuda:0 -> cuda:1 in pieces over several streams, with and without checksums

    python benchmarks/probe.py [--scale 1.0] [--reps 5]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def timed(fn, reps: int, sync) -> float:
    fn()
    sync()
    runs = []
    for _ in range(reps):
        sync()
        began = time.perf_counter()
        fn()
        sync()
        runs.append((time.perf_counter() - began) * 1e3)
    return statistics.median(runs)


def report(rows: list[tuple[str, float]], limit: float, title: str) -> None:
    print(f"\n== {title}")
    for label, ms in rows:
        print(f"  {label:<58} {ms:9.3f} ms  {ms / limit:7.3f}x")
    sys.stdout.flush()


class _Party:
    """One probe process (rank k on cuda:k): the set (Qwen2-7B-shaped, bf16) and its flat buffer,
    the TCPStore and NCCL communicator between the two processes, and the stream NCCL runs on."""

    def __init__(self, rank: int, port: int, args):
        from transfer import qwen2_shapes
        from weightsync.kernels import warm_up
        from weightsync.layout import Layout
        from weightsync.transports.nccl_lib import Communicator, new_unique_id

        self.rank, self.args = rank, args
        self.device = torch.device("cuda", rank)
        torch.cuda.set_device(self.device)
        self.store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=datetime.timedelta(seconds=300))
        self.shapes = qwen2_shapes(args.scale)
        self.params = [torch.randn(s, dtype=torch.bfloat16, device=self.device) for _, s in self.shapes]
        self.layout = Layout.of_sizes([p.numel() * 2 for p in self.params], 256)
        self.flat = torch.empty(self.layout.total_bytes, dtype=torch.uint8, device=self.device)
        self.nbytes = self.flat.numel()
        if rank == 0:
            self.store.set("uid", new_unique_id())
        self.comm = Communicator(self.store.get("uid"), rank, 2, 120)
        self.stream = torch.cuda.Stream(self.device, priority=-1)
        self.tiny = torch.zeros(8, dtype=torch.uint8, device=self.device)
        self.tiny_out = torch.zeros(16, dtype=torch.uint8, device=self.device)
        warm_up(self.device)

    def sync_all(self) -> None:
        """Both processes here, and the NCCL stream idle: a tiny all_gather, waited for."""
        self.comm.all_gather(self.tiny.data_ptr(), self.tiny_out.data_ptr(), 8, self.stream.cuda_stream)
        self.stream.synchronize()

    def bcast(self, t: torch.Tensor) -> None:
        self.comm.broadcast(t.data_ptr(), t.numel() * t.element_size(), 0, self.stream.cuda_stream)

    def bcast_group(self, tensors: list[torch.Tensor]) -> None:
        """The tensors' broadcasts in one NCCL group."""
        self.comm.group_start()
        for t in tensors:
            self.bcast(t)
        self.comm.group_end()

    def chunks_of(self, k: int) -> list[torch.Tensor]:
        step = -(-self.nbytes // k) // 256 * 256 + 256
        return [self.flat[i : i + step] for i in range(0, self.nbytes, step)]


def worker(rank: int, port: int, args) -> None:
    p = _Party(rank, port, args)
    only = set(args.only.split(","))
    if "nccl" in only:
        _nccl_section(p)
    if "store" in only:
        for size in (1, 40_000):
            _store_trips(p, size)
    p.sync_all()
    _sync_trips(p)
    p.sync_all()
    if rank == 0 and "local" in only:
        _local_section(p)
    p.sync_all()
    if rank == 1 and "peer" in only:
        _peer_section(p)
    p.sync_all()
    p.comm.abort()


def _nccl_cases(p: _Party):
    """(label, call) for each way of broadcasting the set: one call, k calls, k calls in one NCCL
    group, one call per tensor in one group or in groups of about --group-bytes."""
    yield "flat: one broadcast", lambda: p.bcast(p.flat)
    for k in (2, 4, 8, 16, 32, 64):
        parts = p.chunks_of(k)
        yield f"{len(parts)} equal broadcasts, back to back", lambda parts=parts: [p.bcast(t) for t in parts]
    for k in (16,):
        parts = p.chunks_of(k)
        yield f"{len(parts)} equal broadcasts in one NCCL group", lambda parts=parts: p.bcast_group(parts)
    yield "per-tensor broadcasts (339), one NCCL group", lambda: p.bcast_group(p.params)
    groups = _size_groups(p.params, p.args.group_bytes)
    yield (f"per-tensor broadcasts in {len(groups)} groups of ~{p.args.group_bytes >> 20} MiB",
           lambda: [p.bcast_group(members) for members in groups])


def _size_groups(params: list[torch.Tensor], group_bytes: int) -> list[list[torch.Tensor]]:
    """The tensors in order, cut into groups once a group holds `group_bytes` (bf16: 2 bytes each)."""
    groups, current, size = [], [], 0
    for t in params:
        current.append(t)
        size += t.numel() * 2
        if size >= group_bytes:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


def _nccl_section(p: _Party) -> None:
    rows = [(label, timed(lambda fn=fn: (fn(), None), p.args.reps, p.sync_all)) for label, fn in _nccl_cases(p)]
    if p.rank == 0 and rows:
        report(rows, rows[0][1], f"nccl, {p.nbytes / 1e9:.2f} GB cuda:0 -> cuda:1 (timed with a tiny all_gather)")


def _store_trips(p: _Party, size: int) -> None:
    """200 control round trips of a `size`-byte value over the TCPStore (rank 0 prints them)."""
    p.sync_all()
    trips = []
    payload = b"x" * size
    for i in range(200):
        if p.rank == 0:
            time.sleep(0.001)  # the reply's get is waiting, as in a round
            began = time.perf_counter()
            p.store.set(f"ping/{size}/{i}", payload)
            p.store.get(f"pong/{size}/{i}")
            trips.append((time.perf_counter() - began) * 1e3)
        else:
            p.store.get(f"ping/{size}/{i}")
            p.store.set(f"pong/{size}/{i}", b"y")
    if p.rank == 0:
        trips.sort()
        print(f"\n== store: {size}-byte set + wait-for-reply round trip over TCPStore: median "
              f"{statistics.median(trips):.3f} ms, p10 {trips[20]:.3f}, p90 {trips[180]:.3f}")


def _sync_trips(p: _Party) -> None:
    """200 tiny all_gathers waited for by the host: the NCCL control step's cost."""
    trips = []
    for i in range(200):
        p.sync_all() if i % 20 == 0 else None
        began = time.perf_counter()
        p.sync_all()
        trips.append((time.perf_counter() - began) * 1e3)
    if p.rank == 0:
        print(f"== nccl: tiny all_gather + host wait: median {statistics.median(trips):.3f} ms")


def _local_section(p: _Party) -> None:
    """Copy and checksum passes over the set on cuda:0: the ipc building blocks."""
    from weightsync.integrity import StreamDigest
    from weightsync.packing import Region, RegionPlan, as_bytes

    device, params, flat, reps = p.device, p.params, p.flat, p.args.reps
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    dst_flat = torch.empty_like(flat)
    outs = [torch.empty_like(t) for t in params]
    srcs = [as_bytes(t) for t in params]
    dsts = [as_bytes(o) for o in outs]
    offsets = p.layout.offsets
    copy_digest = RegionPlan([Region(s, d, o) for s, d, o in zip(srcs, dsts, offsets, strict=True)],
                             copy=True, digest=True)
    copy_only = RegionPlan([Region(s, d, o) for s, d, o in zip(srcs, dsts, offsets, strict=True)],
                           copy=True, digest=False)
    digest_only = RegionPlan([Region(s, None, o) for s, o in zip(srcs, offsets, strict=True)], copy=False)
    side = torch.cuda.Stream(device)
    rows = [("cudaMemcpy of the flat set (limit)", timed(lambda: dst_flat.copy_(flat), reps, sync))]
    rows.append(("per-tensor copy_ (339 calls)",
                 timed(lambda: [o.copy_(t) for o, t in zip(outs, params, strict=True)], reps, sync)))
    rows.append(("batched kernel: copy", timed(lambda: copy_only.run(None), reps, sync)))
    rows.append(("batched kernel: copy + checksum", timed(lambda: copy_digest.run(StreamDigest(device)), reps, sync)))
    rows.append(("batched kernel: checksum only", timed(lambda: digest_only.run(StreamDigest(device)), reps, sync)))

    def both():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            digest_only.run(StreamDigest(device))
        copy_digest.run(StreamDigest(device))
        torch.cuda.current_stream().wait_stream(side)
    rows.append(("copy + checksum with a concurrent checksum-only pass", timed(both, reps, sync)))
    for programs in (32, 64, 132, 264):
        rows.append((f"batched kernel: copy + checksum, {programs} programs",
                     timed(lambda programs=programs: copy_digest.run(StreamDigest(device), programs), reps, sync)))
    report(rows, rows[0][1], "local passes over the set on cuda:0")  # returning frees the copies' memory


class _PeerCopies:
    """Peer copies of `src` (on cuda:0) into this process's flat buffer (cuda:1) in pieces spread
    over copy streams, each piece checksummed on a side stream as it lands when asked."""

    def __init__(self, p: _Party, src: torch.Tensor):
        self.flat, self.nbytes, self.device, self.src = p.flat, p.nbytes, p.device, src
        self.copy_streams = [torch.cuda.Stream(p.device) for _ in range(8)]
        self.check = torch.cuda.Stream(p.device)
        self.cur = torch.cuda.current_stream(p.device)

    def pieces(self, piece: int, nstreams: int, checksum: bool):
        """The copy in `piece`-byte pieces over `nstreams` streams, as a call (its checksum plans
        made here, once)."""
        from weightsync.packing import Region, RegionPlan

        plans = [RegionPlan([Region(self.flat[start : start + piece], None, start)], copy=False)
                 for start in range(0, self.nbytes, piece)] if checksum else None
        return lambda: self._run(piece, nstreams, checksum, plans)

    def _run(self, piece: int, nstreams: int, checksum: bool, plans) -> None:
        from weightsync.integrity import StreamDigest

        for s in self.copy_streams[:nstreams]:
            s.wait_stream(self.cur)
        self.check.wait_stream(self.cur)
        digest = StreamDigest(self.device) if checksum else None
        for n, start in enumerate(range(0, self.nbytes, piece)):
            s = self.copy_streams[n % nstreams]
            stop = min(start + piece, self.nbytes)
            with torch.cuda.stream(s):
                self.flat[start:stop].copy_(self.src[start:stop], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(s)
            if checksum:
                self.check.wait_event(ev)
                with torch.cuda.stream(self.check):
                    plans[n].run(digest)
        for s in self.copy_streams[:nstreams]:
            self.cur.wait_stream(s)
        self.cur.wait_stream(self.check)


def _peer_section(p: _Party) -> None:
    """Peer copies cuda:0 -> cuda:1 from one process (the copy engines): one copy of the set is
    the limit; pieces over several streams, with and without checksums as they land."""
    from weightsync.integrity import StreamDigest
    from weightsync.packing import Region, RegionPlan

    device, reps = p.device, p.args.reps
    src = torch.empty(p.nbytes, dtype=torch.uint8, device="cuda:0")
    src_params = [torch.randn(s, dtype=torch.bfloat16, device="cuda:0") for _, s in p.shapes]
    sync = lambda: (torch.cuda.synchronize(device), torch.cuda.synchronize(0))  # noqa: E731
    copies = _PeerCopies(p, src)
    rows = [("one peer copy of the flat set (limit)", timed(lambda: p.flat.copy_(src), reps, sync))]
    for piece in (256 << 20, 1 << 30):
        for nstreams in (1, 2, 4):
            rows.append((f"pieces of {piece >> 20} MiB over {nstreams} streams",
                         timed(copies.pieces(piece, nstreams, False), reps, sync)))
    for piece in (64 << 20, 256 << 20):
        rows.append((f"pieces of {piece >> 20} MiB over 4 streams, checksum each as it lands",
                     timed(copies.pieces(piece, 4, True), reps, sync)))
    src_digest = RegionPlan([Region(src, None, 0)], copy=False)
    side0 = torch.cuda.Stream(0)

    def with_source_checksum():
        side0.wait_stream(torch.cuda.current_stream(0))
        with torch.cuda.stream(side0):
            src_digest.run(StreamDigest("cuda:0"))
        copies.pieces(256 << 20, 4, True)()
    rows.append(("256 MiB pieces + checksums + source checksum on cuda:0", timed(with_source_checksum, reps, sync)))
    per_tensor = list(zip(p.params, src_params, strict=True))
    rows.append(("per-tensor peer copy_ (339 calls, one stream)",
                 timed(lambda: [d.copy_(s, non_blocking=True) for d, s in per_tensor], reps, sync)))
    report(rows, rows[0][1], "peer copies cuda:0 -> cuda:1 (copy engines)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--group-bytes", type=int, default=1 << 30)
    parser.add_argument("--only", default="nccl,store,local,peer", help="sections to run")
    args = parser.parse_args()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, args), nprocs=2, join=True)


if __name__ == "__main__":
    main()
