"""CPU-checkable parts of the GPU transports: one checksum whatever path moved the bytes, ramped
chunking, IPC handle validation, the coordinator's relay of a trainer's handles, `--backend auto`."""

from __future__ import annotations

import asyncio
import base64
import json
from types import SimpleNamespace

import httpx
import pytest
import torch

from weightsync.errors import ProtocolError
from weightsync.integrity import SAMPLE_STRIDE, SAMPLE_WINDOW, StreamDigest, sample_ranges
from weightsync.layout import Layout, ramp_sizes
from weightsync.packing import Region, RegionPlan, landed_regions, pack_regions, sampled_regions, unpack_regions
from weightsync.transports.cuda_ipc import GpuHandles, content_key, parse_handles, rebind_device
from weightsync.transports.lending.header import HandleExporter, HandleReader, RoundFlags
from weightsync.transports.p2p import P2pOptions, PeerCopy
from weightsync_operator.client import Endpoint
from weightsync_operator.coordinator import Coordinator, SyncSpec
from weightsync_operator.demo.hardware import choose_backend


def _tensors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(300, 64), (13,), (1000,), (5, 7), (4096,), (0,), (777,), (1 << 20 | 3,)]  # the last: > 4 MiB
    dtypes = [torch.bfloat16, torch.float16, torch.int8, torch.float32, torch.float32, torch.float32, torch.int8,
              torch.float32]
    out = []
    for shape, dtype in zip(sizes, dtypes, strict=True):
        t = torch.randn(shape, generator=gen) * 50
        out.append(t.to(dtype))
    return [t.reshape(-1).view(torch.uint8) for t in out]


@pytest.mark.parametrize("ramp", [False, True])
def test_one_checksum_whatever_path_moved_the_bytes(ramp):
    """Packed chunks (trainer), chunks landed in place or unpacked (receivers), tensors read where
    they lie (ipc) and copy-engine pieces (p2p): the same stream, the same checksum."""
    sources = _tensors()
    layout = Layout.of_sizes([s.numel() for s in sources])
    buffer_size = 1 << 20
    chunks = layout.chunks(buffer_size, ramp=ramp)
    assert all(c.nbytes <= buffer_size for c in chunks)

    packed = StreamDigest("cpu")
    target = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    staged = StreamDigest("cpu")
    outs = [torch.zeros_like(s) for s in sources]
    for chunk in chunks:
        buffer = torch.full((buffer_size,), 0xAB, dtype=torch.uint8)  # garbage in the padding
        RegionPlan(pack_regions(chunk, sources, buffer)).run(packed)
        target[chunk.start : chunk.stop] = buffer[: chunk.nbytes]
        RegionPlan(unpack_regions(chunk, buffer[: chunk.nbytes], outs)).run(staged)
    landed = StreamDigest("cpu")
    for chunk in chunks:
        RegionPlan(landed_regions(chunk, target), copy=False).run(landed)
    lent = StreamDigest("cpu")
    RegionPlan([Region(s, None, off) for s, off in zip(sources, layout.offsets, strict=True)], copy=False).run(lent)
    pulled = StreamDigest("cpu")
    dests = [torch.zeros_like(s) for s in sources]
    prepared = SimpleNamespace(sources=sources, destinations=dests, offsets=layout.offsets)
    p2p = PeerCopy(torch.device("cpu"), None, P2pOptions())  # the transport's default options
    plan = p2p.copy_plan(prepared, True)  # copy engines + one small-tensor kernel
    plan.small.run(pulled)
    for dst, src in plan.pieces:
        dst.copy_(src)
    for group in plan.groups:
        group.checksum.run(pulled)

    assert all(torch.equal(a, b) for a, b in zip(outs, sources, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(dests, sources, strict=True))
    values = {d.hexdigest() for d in (packed, landed, staged, lent, pulled)}
    assert len(values) == 1

    flipped = [s.clone() for s in sources]
    flipped[2][5] ^= 1
    other = StreamDigest("cpu")
    RegionPlan([Region(s, None, off) for s, off in zip(flipped, layout.offsets, strict=True)], copy=False).run(other)
    assert other.hexdigest() not in values


def test_ramped_chunks_grow_then_shrink_and_stay_within_a_buffer():
    mib = 1 << 20
    sizes = ramp_sizes(15_230_000_000, 1 << 30)
    assert sum(sizes) == 15_230_000_000 and max(sizes) == 1 << 30
    assert sizes[:3] == [256 * mib, 512 * mib, 1024 * mib]
    assert sizes[-1] <= 512 * mib and sizes[-2] > sizes[-1] or len(sizes) < 4
    assert all(s % 256 == 0 for s in sizes[:-1])


def _gpu_handles(**change):
    raw = {"round_id": "r1", "device": 3, "storages": [{
        "handle": base64.b64encode(b"h" * 64).decode(), "size_bytes": 4096, "offset_bytes": 512,
        "ref_counter_handle": base64.b64encode(b"/torch_123").decode(), "ref_counter_offset": 0}],
        "tensors": [{"storage": 0, "offset": 0, "nbytes": 1024}, {"storage": 0, "offset": 1024, "nbytes": 3072}]}
    raw.update(change)
    return raw


def test_ipc_handles_are_validated_json_and_rebound_by_one_helper():
    handles = parse_handles({"GPU-a": _gpu_handles()})["GPU-a"]
    assert rebind_device(handles, 0).device == 0 and handles.device == 3
    assert json.loads(handles.model_dump_json())["storages"][0]["size_bytes"] == 4096
    with pytest.raises(ProtocolError, match=r"ipc_handles\.GPU-a\.storages\.0\.handle"):
        parse_handles({"GPU-a": _gpu_handles(storages=[{**_gpu_handles()["storages"][0], "handle": "%%%"}])})
    with pytest.raises(ProtocolError, match="past the end"):
        parse_handles({"GPU-a": _gpu_handles(tensors=[{"storage": 0, "offset": 4000, "nbytes": 100}])})
    with pytest.raises(ProtocolError, match="names storage 1"):
        parse_handles({"GPU-a": _gpu_handles(tensors=[{"storage": 1, "offset": 0, "nbytes": 1}])})
    with pytest.raises(ProtocolError, match="format"):
        parse_handles({"GPU-a": _gpu_handles(format="pickle")})
    with pytest.raises(ProtocolError, match="ipc_handles"):
        parse_handles([])
    assert GpuHandles.model_fields["format"].default == "weightsync-ipc/1"
    keyed = parse_handles({"GPU-a": _gpu_handles(key=content_key(3, handles.storages, handles.tensors))})["GPU-a"]
    assert keyed.key == content_key(3, keyed.storages, keyed.tensors) != content_key(0, keyed.storages, keyed.tensors)



def test_a_receiver_validates_a_handles_body_once_and_only_the_round_flags_change_after():
    """The receiver's HandleReader: a repeat round's body (same storages and placements, new
    round flags) reuses what was validated, with the new flags; a changed placement is validated
    again and bumps the version (the receiver then plans the round afresh); the trainer's
    HandleExporter.compose puts exactly these flags on a cached body."""
    reader = HandleReader("ipc", torch.device("cuda", 1))
    pick = lambda uuids: "GPU-a"  # noqa: E731 - the copy strategy's choice
    first = reader.read({"GPU-a": _gpu_handles()}, pick)
    assert first.device == 1 and reader.version == 1  # rebound to the receiver's device
    body = {"update_kind": "dense", "ipc_handles": {"GPU-a": _gpu_handles()}}
    flags = RoundFlags("r2-0", more=True, verify=True, sampled=True)
    composed = HandleExporter.compose(body, flags)
    assert composed["ipc_handles"]["GPU-a"] == {**_gpu_handles(), "round_id": "r2-0", "more": True, "verify": True,
                                                "sampled": True} and composed["update_kind"] == "dense"
    again = reader.read(composed["ipc_handles"], pick)
    assert reader.version == 1 and RoundFlags.of(again) == flags and again.storages == first.storages
    moved = reader.read({"GPU-a": _gpu_handles(tensors=[{"storage": 0, "offset": 0, "nbytes": 4096}])}, pick)
    assert reader.version == 2 and moved.tensors[0].nbytes == 4096
    with pytest.raises(ProtocolError, match=r"ipc_handles\.GPU-a\.format"):
        reader.read({"GPU-a": _gpu_handles(format="pickle")}, pick)
    with pytest.raises(ProtocolError, match="the ipc transport needs the trainer's handles"):
        reader.read({}, pick)
    assert reader.version == 2


def test_the_coordinator_relays_the_trainers_handles_batch_by_batch():
    """ipc/p2p parties need CUDA, so they are emulated at the HTTP level here (the GPU tests run
    the real ones): the trainer answers with handles twice (more, then done); the target must
    receive exactly those, after the trainer answered, in order."""
    seen: list[tuple[str, dict]] = []
    batches = iter([{"bytes": 100, "more": True, "update_info": {"names": ["a"], "batch": 1}},
                    {"bytes": 50, "more": False, "update_info": {"names": ["b"], "batch": 2}, "checksum": None}])

    def handler(request: httpx.Request) -> httpx.Response:
        party = request.url.host
        path = request.url.path
        body = json.loads(request.content or b"{}")
        if path == "/get_world_size":
            return httpx.Response(200, json={"world_size": 1})
        if path == "/update_weights":
            seen.append((party, body["update_info"]))
            if party == "trainer":
                return httpx.Response(200, json={"round_id": "x", **next(batches)})
            return httpx.Response(200, json={"bytes": 1, "checksum": "c0ffee"})
        if path == "/finish_weight_update":
            return httpx.Response(200, json={"weight_version": body["weight_version"]})
        return httpx.Response(200, json={"message": "ok"})

    async def drive():
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        spec = SyncSpec(backend="ipc", pause_mode=None)
        async with Coordinator(Endpoint("trainer", "http://trainer"), [Endpoint("daemon", "http://daemon")],
                               spec, http) as coordinator:
            await coordinator.init()
            return await coordinator.sync(7)

    result = asyncio.run(drive())
    assert result.ok, result.reason
    assert seen == [("trainer", {}), ("daemon", {"names": ["a"], "batch": 1}),
                    ("trainer", {}), ("daemon", {"names": ["b"], "batch": 2})]
    assert result.bytes == 150 and result.checksum == "c0ffee"


@pytest.mark.parametrize("gpus, peer, expected", [(0, False, "cpu"), (1, False, "ipc"), (2, True, "p2p"),
                                                  (8, False, "nccl")])
def test_backend_auto_picks_the_fastest_transport_the_hardware_offers(gpus, peer, expected):
    assert choose_backend("auto", gpus, peer) == expected
    assert choose_backend("nccl", gpus, peer) == "nccl"  # an explicit choice wins


def test_demo_refuses_an_nccl_group_with_two_parties_on_one_gpu(monkeypatch):
    # No GPU here: present two, as a 2-GPU host would, to check the placement rule itself.
    from weightsync_operator.demo import hardware

    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hardware.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(hardware.torch.cuda, "can_device_access_peer", lambda a, b: True)
    with pytest.raises(SystemExit, match="need 3 GPUs and 2 are visible; use --daemons 1"):
        hardware.place("nccl", daemons=2)
    assert hardware.place("nccl", daemons=1).daemon_devices == ["cuda:1"]
    assert hardware.place("auto", daemons=2) == hardware.Placement("p2p", "cuda:0", ["cuda:1", "cuda:1"])


def test_p2p_groups_cover_the_stream_once_and_shrink_towards_its_end(monkeypatch):
    """Copy-engine pieces tile every tensor exactly once, in order; the groups (each checksummed
    once it landed) halve towards the end, so the last checksum is a small one."""
    from weightsync.transports import p2p

    monkeypatch.setattr(p2p, "PIECE_BYTES", 1 << 20)
    monkeypatch.setattr(p2p, "TAIL_BYTES", 64 << 10)
    sources = [torch.arange(n, dtype=torch.uint8) for n in (3 << 20, 5, 1 << 20, 700_001)]
    dests = [torch.zeros_like(s) for s in sources]
    offsets = Layout.of_sizes([s.numel() for s in sources]).offsets
    plan = p2p.piece_plan(sources, dests, offsets, verify=False)
    for dst, src in plan.pieces:
        dst.copy_(src)
    assert all(torch.equal(a, b) for a, b in zip(dests, sources, strict=True))
    assert sum(piece.src.numel() for piece in plan.pieces) == sum(s.numel() for s in sources)
    assert all(group.checksum is None for group in plan.groups)
    sizes = [sum(plan.pieces[i].src.numel() for i in group.members) for group in plan.groups]
    assert max(sizes) <= 1 << 20 and sizes[0] == 1 << 20
    assert sizes[-1] <= 128 << 10 and sizes[-3:] == sorted(sizes[-3:], reverse=True)


def test_a_sample_covers_every_tensor_and_every_stride_and_checksums_alike_on_both_ends():
    """ipc's sampled checksum: small tensors whole, large ones at both ends and at each stride
    of the stream, in 8-byte aligned ranges; the trainer's ranges of its tensors and the
    receiver's ranges of its copy give one value, and a change in any range shows."""
    sizes = [30, 3 * SAMPLE_WINDOW + 6, 3 * SAMPLE_STRIDE + 1000, SAMPLE_STRIDE // 2]
    layout = Layout.of_sizes(sizes)
    ranges = sample_ranges(layout.sizes, layout.offsets)
    by_tensor: dict[int, list[tuple[int, int]]] = {}
    for index, start, stop in ranges:
        by_tensor.setdefault(index, []).append((start, stop))
        assert start % 8 == 0 and 0 <= start < stop <= sizes[index]
    assert by_tensor[0] == [(0, 30)]
    for index, size in enumerate(sizes[1:], 1):  # both ends of every larger tensor
        assert by_tensor[index][0][0] == 0 and by_tensor[index][-1][1] == size
        spans = by_tensor[index]
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))  # merged, in order, disjoint
    for stride in range(0, layout.total_bytes, SAMPLE_STRIDE):  # every stride's first bytes
        index = max(i for i, off in enumerate(layout.offsets) if off <= stride)
        if stride < layout.offsets[index] + sizes[index]:
            assert any(a <= stride - layout.offsets[index] < b for a, b in by_tensor[index])
    sampled = sum(stop - start for _, start, stop in ranges)
    assert sampled < sum(sizes) / 8

    source = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in sizes]
    copy = [t.clone() for t in source]

    def sample_sum(tensors):
        digest = StreamDigest("cpu")
        RegionPlan(sampled_regions(tensors, layout.offsets), copy=False).run(digest)
        return digest.hexdigest()

    assert sample_sum(source) == sample_sum(copy)
    copy[2][SAMPLE_STRIDE - layout.offsets[2] % SAMPLE_STRIDE + 5] ^= 1  # inside a stride window
    assert sample_sum(source) != sample_sum(copy)
