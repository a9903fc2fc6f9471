"""Sources on GPUs (issue 15): nccl streams a source (trainer cuda:0, daemon cuda:1), ipc needs it
resident (trainer and daemon on cuda:0). The source casts fp32 weights to bf16 as it goes, so
every tensor it yields is a new allocation: the trainer's peak CUDA memory over the round shows
how many of them a round holds at once."""

from __future__ import annotations


import pytest
import torch

from helpers.gpu import collective_round, expected, joined_pair, need_gpus, relayed_round
from helpers.lying_source import Lying
from weightsync.errors import SourceMismatch
from weightsync.source import ModuleSource

pytestmark = pytest.mark.gpu
BUFFER = 1 << 20
TENSORS, SIDE = 16, 2048  # 16 fp32 tensors of 16 MiB; 128 MiB on the wire as bf16


def _model(seed: int) -> torch.nn.Module:
    gen = torch.Generator(device="cuda:0").manual_seed(seed)
    model = torch.nn.Module()
    for i in range(TENSORS):
        setattr(model, f"w{i}", torch.nn.Parameter(torch.randn(SIDE, SIDE, generator=gen, device="cuda:0")))
    return model


@pytest.fixture(params=["nccl", "ipc"])
def pair(request):
    backend = request.param
    need_gpus(2 if backend == "nccl" else 1)
    with joined_pair(backend, "cuda:1" if backend == "nccl" else "cuda:0", BUFFER, 3) as (daemon, sender):
        yield backend, daemon, sender


def _round(backend, daemon, sender, source, version):
    send = lambda: sender.send_weights(source)  # noqa: E731
    if backend == "nccl":
        sent, answer = collective_round(daemon, send, version)
        return sent, [answer]
    return relayed_round(daemon, sender, send, version)


def test_a_source_lands_bit_exact_and_nccl_streams_it(pair):
    backend, daemon, sender = pair
    wire = TENSORS * SIDE * SIDE * 2
    peaks = []
    for version in (1, 2, 3):
        model = _model(version)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(0)
        torch.cuda.reset_peak_memory_stats(0)
        sent, answers = _round(backend, daemon, sender, ModuleSource(model, dtype=torch.bfloat16), version)
        assert not isinstance(sent, BaseException), sent
        assert [a.status_code for a in answers] == [200] * len(answers), [a.text for a in answers]
        peaks.append(torch.cuda.max_memory_allocated(0) - before)
        assert daemon.checksum() == expected([(n, t.to(torch.bfloat16)) for n, t in model.named_parameters()])
    print(f"\n[{backend}] wire {wire >> 20} MiB; trainer peak CUDA memory over the round: "
          f"{[p >> 20 for p in peaks]} MiB", flush=True)
    if backend == "nccl":  # the buffers and one cast tensor (8 MiB) at a time
        assert max(peaks[1:]) < wire // 4
    else:  # ipc lends every tensor for the whole round: the source is materialized whole
        assert min(peaks) >= wire


def test_a_source_contradicting_its_metadata_is_refused_by_name(pair):
    backend, daemon, sender = pair
    model = _model(7)
    lying_source = Lying(ModuleSource(model, dtype=torch.bfloat16), 5, lambda tensor: tensor[:-1])
    sent, answers = _round(backend, daemon, sender, lying_source, 7)
    assert isinstance(sent, SourceMismatch) and "'w5'" in str(sent), sent
    if backend == "nccl":  # the receiver took part in the round and names the parameter too
        assert answers[0].status_code >= 400 and "'w5'" in answers[0].text, answers[0].text
        daemon.post("/abort_weight_update")
    else:  # nothing was lent: the daemon never started receiving
        assert answers == []
        daemon.post("/abort_weight_update")
        sender.transport.end_round()
    good = _model(8)
    sent, answers = _round(backend, daemon, sender, ModuleSource(good, dtype=torch.bfloat16), 8)
    assert [a.status_code for a in answers] == [200] * len(answers), [a.text for a in answers]
    assert daemon.checksum() == expected([(n, t.to(torch.bfloat16)) for n, t in good.named_parameters()])
