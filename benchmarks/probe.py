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


def worker(rank: int, port: int, args) -> None:
    from transfer import qwen2_shapes
    from weightsync.packing import Region, RegionPlan, as_bytes
    from weightsync.integrity import StreamDigest
    from weightsync.kernels import warm_up
    from weightsync.layout import Layout
    from weightsync.transports.nccl_lib import Communicator, new_unique_id

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=datetime.timedelta(seconds=300))
    shapes = qwen2_shapes(args.scale)
    params = [torch.randn(s, dtype=torch.bfloat16, device=device) for _, s in shapes]
    layout = Layout.of_sizes([p.numel() * 2 for p in params], 256)
    flat = torch.empty(layout.total_bytes, dtype=torch.uint8, device=device)
    nbytes = flat.numel()
    if rank == 0:
        store.set("uid", new_unique_id())
    comm = Communicator(store.get("uid"), rank, 2, 120)
    stream = torch.cuda.Stream(device, priority=-1)
    tiny = torch.zeros(8, dtype=torch.uint8, device=device)
    tiny_out = torch.zeros(16, dtype=torch.uint8, device=device)
    warm_up(device)

    def sync_all() -> None:
        comm.all_gather(tiny.data_ptr(), tiny_out.data_ptr(), 8, stream.cuda_stream)
        stream.synchronize()

    def bcast(t: torch.Tensor) -> None:
        comm.broadcast(t.data_ptr(), t.numel() * t.element_size(), 0, stream.cuda_stream)

    def chunks_of(k: int) -> list[torch.Tensor]:
        step = -(-nbytes // k) // 256 * 256 + 256
        return [flat[i : i + step] for i in range(0, nbytes, step)]

    def cases():
        yield "flat: one broadcast", lambda: bcast(flat)
        for k in (2, 4, 8, 16, 32, 64):
            parts = chunks_of(k)
            yield f"{len(parts)} equal broadcasts, back to back", lambda parts=parts: [bcast(p) for p in parts]
        for k in (16,):
            parts = chunks_of(k)

            def grouped(parts=parts):
                comm.group_start()
                for p in parts:
                    bcast(p)
                comm.group_end()
            yield f"{len(parts)} equal broadcasts in one NCCL group", grouped

        def per_tensor_one_group():
            comm.group_start()
            for p in params:
                bcast(p)
            comm.group_end()
        yield "per-tensor broadcasts (339), one NCCL group", per_tensor_one_group
        gib_groups, current, size = [], [], 0
        for p in params:
            current.append(p)
            size += p.numel() * 2
            if size >= args.group_bytes:
                gib_groups.append(current)
                current, size = [], 0
        if current:
            gib_groups.append(current)

        def per_tensor_groups():
            for members in gib_groups:
                comm.group_start()
                for p in members:
                    bcast(p)
                comm.group_end()
        yield f"per-tensor broadcasts in {len(gib_groups)} groups of ~{args.group_bytes >> 20} MiB", per_tensor_groups

    only = set(args.only.split(","))
    rows = []
    for label, fn in (cases() if "nccl" in only else []):
        ms = timed(lambda fn=fn: (fn(), None), args.reps, sync_all)
        rows.append((label, ms))
    if rank == 0 and rows:
        report(rows, rows[0][1], f"nccl, {nbytes / 1e9:.2f} GB cuda:0 -> cuda:1 (timed with a tiny all_gather)")

    # -- store round trips -------------------------------------------------------------------
    for size in ((1, 40_000) if "store" in only else ()):
        sync_all()
        trips = []
        payload = b"x" * size
        for i in range(200):
            if rank == 0:
                time.sleep(0.001)  # the reply's get is waiting, as in a round
                began = time.perf_counter()
                store.set(f"ping/{size}/{i}", payload)
                store.get(f"pong/{size}/{i}")
                trips.append((time.perf_counter() - began) * 1e3)
            else:
                store.get(f"ping/{size}/{i}")
                store.set(f"pong/{size}/{i}", b"y")
        if rank == 0:
            trips.sort()
            print(f"\n== store: {size}-byte set + wait-for-reply round trip over TCPStore: median "
                  f"{statistics.median(trips):.3f} ms, p10 {trips[20]:.3f}, p90 {trips[180]:.3f}")
    sync_all()
    trips = []
    for i in range(200):
        sync_all() if i % 20 == 0 else None
        began = time.perf_counter()
        sync_all()
        trips.append((time.perf_counter() - began) * 1e3)
    if rank == 0:
        print(f"== nccl: tiny all_gather + host wait: median {statistics.median(trips):.3f} ms")
    sync_all()

    # -- local passes on cuda:0 (ipc building blocks) ------------------------------------------
    if rank == 0 and "local" in only:
        sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
        dst_flat = torch.empty_like(flat)
        outs = [torch.empty_like(p) for p in params]
        srcs = [as_bytes(p) for p in params]
        dsts = [as_bytes(o) for o in outs]
        offsets = layout.offsets
        copy_digest = RegionPlan([Region(s, d, o) for s, d, o in zip(srcs, dsts, offsets, strict=True)],
                                 copy=True, digest=True)
        copy_only = RegionPlan([Region(s, d, o) for s, d, o in zip(srcs, dsts, offsets, strict=True)],
                               copy=True, digest=False)
        digest_only = RegionPlan([Region(s, None, o) for s, o in zip(srcs, offsets, strict=True)], copy=False)
        side = torch.cuda.Stream(device)
        rows = [("cudaMemcpy of the flat set (limit)", timed(lambda: dst_flat.copy_(flat), args.reps, sync))]
        rows.append(("per-tensor copy_ (339 calls)",
                     timed(lambda: [o.copy_(p) for o, p in zip(outs, params, strict=True)], args.reps, sync)))
        rows.append(("batched kernel: copy", timed(lambda: copy_only.run(None), args.reps, sync)))
        rows.append(("batched kernel: copy + checksum", timed(lambda: copy_digest.run(StreamDigest(device)),
                                                              args.reps, sync)))
        rows.append(("batched kernel: checksum only", timed(lambda: digest_only.run(StreamDigest(device)),
                                                            args.reps, sync)))

        def both():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                digest_only.run(StreamDigest(device))
            copy_digest.run(StreamDigest(device))
            torch.cuda.current_stream().wait_stream(side)
        rows.append(("copy + checksum with a concurrent checksum-only pass", timed(both, args.reps, sync)))
        for programs in (32, 64, 132, 264):
            rows.append((f"batched kernel: copy + checksum, {programs} programs",
                         timed(lambda programs=programs: copy_digest.run(StreamDigest(device), programs),
                               args.reps, sync)))
        report(rows, rows[0][1], "local passes over the set on cuda:0")
        del dst_flat, outs
    sync_all()

    # -- peer copies cuda:0 -> cuda:1 in one process -------------------------------------------
    if rank == 1 and "peer" in only:
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
        src_params = [torch.randn(s, dtype=torch.bfloat16, device="cuda:0") for _, s in shapes]
        sync = lambda: (torch.cuda.synchronize(device), torch.cuda.synchronize(0))  # noqa: E731
        copy_streams = [torch.cuda.Stream(device) for _ in range(8)]
        check = torch.cuda.Stream(device)
        cur = torch.cuda.current_stream(device)

        def pieces(piece: int, nstreams: int, checksum: bool):
            plans = [RegionPlan([Region(flat[start : start + piece], None, start)], copy=False)
                     for start in range(0, nbytes, piece)] if checksum else None

            def run():
                for s in copy_streams[:nstreams]:
                    s.wait_stream(cur)
                check.wait_stream(cur)
                digest = StreamDigest(device) if checksum else None
                for n, start in enumerate(range(0, nbytes, piece)):
                    s = copy_streams[n % nstreams]
                    stop = min(start + piece, nbytes)
                    with torch.cuda.stream(s):
                        flat[start:stop].copy_(src[start:stop], non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(s)
                    if checksum:
                        check.wait_event(ev)
                        with torch.cuda.stream(check):
                            plans[n].run(digest)
                for s in copy_streams[:nstreams]:
                    cur.wait_stream(s)
                cur.wait_stream(check)
            return run

        rows = [("one peer copy of the flat set (limit)", timed(lambda: flat.copy_(src), args.reps, sync))]
        for piece in (256 << 20, 1 << 30):
            for nstreams in (1, 2, 4):
                rows.append((f"pieces of {piece >> 20} MiB over {nstreams} streams",
                             timed(pieces(piece, nstreams, False), args.reps, sync)))
        for piece in (64 << 20, 256 << 20):
            rows.append((f"pieces of {piece >> 20} MiB over 4 streams, checksum each as it lands",
                         timed(pieces(piece, 4, True), args.reps, sync)))
        src_digest = RegionPlan([Region(src, None, 0)], copy=False)
        side0 = torch.cuda.Stream(0)

        def with_source_checksum():
            side0.wait_stream(torch.cuda.current_stream(0))
            with torch.cuda.stream(side0):
                src_digest.run(StreamDigest("cuda:0"))
            pieces(256 << 20, 4, True)()
        rows.append(("256 MiB pieces + checksums + source checksum on cuda:0", timed(with_source_checksum,
                                                                                     args.reps, sync)))
        per_tensor = list(zip(params, src_params, strict=True))
        rows.append(("per-tensor peer copy_ (339 calls, one stream)",
                     timed(lambda: [d.copy_(s, non_blocking=True) for d, s in per_tensor], args.reps, sync)))
        report(rows, rows[0][1], "peer copies cuda:0 -> cuda:1 (copy engines)")
    sync_all()
    comm.abort()


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
