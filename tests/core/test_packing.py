"""Layout, packing and the stream checksum: every byte lands where it belongs."""

import pytest
import torch

from weightsync.dtypes import tensors_manifest
from weightsync.integrity import StreamDigest
from weightsync.layout import Layout
from weightsync.packing import as_bytes, pack_regions, unpack_regions
from weightsync.store import WeightStore


def _round_trip(tensors, buffer_size):
    """Pack every tensor through buffers of `buffer_size` and unpack into fresh tensors, by the
    regions the transports copy (`pack_regions`, `unpack_regions`)."""
    layout = Layout.of_sizes([as_bytes(t).numel() for t in tensors])
    sources = [as_bytes(t) for t in tensors]
    outs = [torch.empty(t.shape, dtype=t.dtype) for t in tensors]
    dests = [o.view(-1).view(torch.uint8) for o in outs]
    buffer = torch.empty(buffer_size, dtype=torch.uint8)
    chunks = layout.chunks(buffer_size)
    for chunk in chunks:
        assert chunk.nbytes <= buffer_size
        for region in pack_regions(chunk, sources, buffer):
            region.dst.copy_(region.src)
        for region in unpack_regions(chunk, buffer, dests):
            region.dst.copy_(region.src)
    return outs, chunks


def test_tensor_larger_than_the_buffer_spans_chunks():
    big = torch.randn(1000, 33)  # 132,000 bytes through 4 KiB buffers
    (out,), chunks = _round_trip([big], 4096)
    assert torch.equal(out, big)
    assert len(chunks) == -(-big.numel() * 4 // 4096)


def test_many_small_tensors_share_buffers():
    tensors = [torch.full((i % 7 + 1,), float(i)) for i in range(500)]
    outs, chunks = _round_trip(tensors, 8192)
    assert all(torch.equal(a, b) for a, b in zip(outs, tensors, strict=True))
    assert len(chunks) < len(tensors)  # packed, not one buffer per tensor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.bool])
def test_dtypes_round_trip_bit_exact(dtype):
    gen = torch.Generator().manual_seed(3)
    raw = torch.randn(37, 11, generator=gen) * 100
    tensor = raw.to(dtype) if dtype is not torch.bool else raw > 0
    mixed = [tensor, torch.arange(5, dtype=torch.int64), tensor.t()]  # a non-contiguous view too
    outs, _ = _round_trip(mixed, 1024)
    for out, src in zip(outs, mixed, strict=True):
        assert out.dtype == src.dtype and torch.equal(out.view(-1), src.contiguous().view(-1))


def test_empty_and_scalar_tensors():
    tensors = [torch.empty(0, 5), torch.tensor(3.5), torch.ones(2, 2)]
    outs, _ = _round_trip(tensors, 1024)
    assert [o.shape for o in outs] == [t.shape for t in tensors]
    assert torch.equal(outs[1], tensors[1]) and torch.equal(outs[2], tensors[2])


def test_layout_aligns_every_tensor():
    layout = Layout.of_sizes([3, 1, 1000, 0, 7], alignment=256)
    assert all(off % 256 == 0 for off in layout.offsets)
    assert layout.total_bytes == layout.offsets[-1] + 7


def test_store_from_manifest_is_one_contiguous_allocation():
    named = [("a", torch.randn(3, 5)), ("b", torch.randn(7).half())]
    store = WeightStore.from_manifest(tensors_manifest(named))
    manifest = store.manifest
    flat = store.contiguous_target(manifest, Layout.of_manifest(manifest))
    assert flat is not None and flat.numel() >= sum(t.numel() * t.element_size() for _, t in named)
    for name, tensor in named:
        store[name].copy_(tensor)
    assert store.mismatch(tensors_manifest(named)) is None
    assert "'a'" in store.mismatch(tensors_manifest([("a", torch.randn(5, 3))]))


def test_stream_digest_detects_a_flipped_byte_and_a_swap():
    data = torch.randint(0, 256, (10_000,), dtype=torch.uint8)

    def digest(buf, cut=4096):
        d = StreamDigest(torch.device("cpu"))
        for start in range(0, buf.numel(), cut):
            d.update(buf[start : start + cut])
        return d.hexdigest()

    base = digest(data)
    assert digest(data.clone(), cut=2048) == base  # independent of how the stream is chunked
    flipped = data.clone()
    flipped[5000] ^= 1
    assert digest(flipped) != base
    swapped = data.clone()
    swapped[0:8], swapped[8:16] = data[8:16].clone(), data[0:8].clone()
    assert digest(swapped) != base
    tail = data.clone()
    tail[-1] ^= 0x80  # a byte in the last partial word
    assert digest(tail) != base
