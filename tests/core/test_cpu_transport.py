"""1 trainer → 3 real daemon processes over gloo: bit-exact rounds, manifest mismatches, sparse."""

import asyncio

import pytest
import pytest_asyncio
import torch

from weightsync import ManifestMismatch, SparsePatch, WeightSender
from weightsync.store import named_checksum


def _model(seed: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        ("embed.weight", torch.randn(300, 64, generator=gen).to(torch.bfloat16)),
        ("layer.0.weight", torch.randn(64, 64, generator=gen)),
        ("layer.0.bias", torch.randn(64, generator=gen).half()),
        ("quant.scale", torch.randint(-128, 127, (1000,), dtype=torch.int8, generator=gen)),
        ("norm.gamma", torch.randn(64, generator=gen)),
    ]


class Group:
    """The test's trainer (rank 0, in this process) and its daemons, driven over real HTTP."""

    def __init__(self, http, daemons, sender):
        self.http, self.daemons, self.sender = http, daemons, sender

    async def call(self, path, body=None):
        return await asyncio.gather(*(self.http.post(d.url + path, json=body or {}) for d in self.daemons))

    async def round(self, send, version, update_info=None):
        """start → (trainer sends while daemons receive) → finish, as a coordinator would."""
        assert all(r.status_code == 200 for r in await self.call("/start_weight_update"))
        sending = asyncio.to_thread(send)
        receiving = self.call("/update_weights", {"update_info": update_info or {}})
        sent, answers = await asyncio.gather(sending, receiving, return_exceptions=True)
        if not isinstance(sent, BaseException) and all(a.status_code == 200 for a in answers):
            finished = await self.call("/finish_weight_update", {"weight_version": version})
            assert all(f.json()["weight_version"] == str(version) for f in finished)
        return sent, answers

    async def checksums(self):
        answers = await self.call("/weight_checker", {"action": "checksum"})
        return [a.json()["checksum"] for a in answers]


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def group(module_spawn, module_http, rendezvous_port):
    """Three daemon processes and the test's trainer, shared by this module's tests."""
    http = module_http
    daemons = await asyncio.gather(*(module_spawn(f"daemon-{i}") for i in range(3)))
    base = {"master_address": "127.0.0.1", "master_port": rendezvous_port, "world_size": 4,
            "packed_buffer_size_bytes": 16384, "packed_num_buffers": 3, "timeout_seconds": 30}
    trainer = asyncio.to_thread(WeightSender.init, {**base, "backend": "cpu"})
    inits = [http.post(d.url + "/init_weight_transfer_engine", json={"init_info": {**base, "rank_offset": i + 1}})
             for i, d in enumerate(daemons)]
    sender, *answers = await asyncio.gather(trainer, *inits)
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    yield Group(http, daemons, sender)
    sender.close()


async def test_rounds_are_bit_exact_on_every_daemon(group):
    for version in range(1, 4):
        named = _model(seed=version)
        sent, answers = await group.round(lambda named=named: group.sender.send_weights(named), version)
        assert sent.payload_bytes >= sum(t.numel() * t.element_size() for _, t in named)
        assert sent.num_chunks > 1  # the 16 KiB buffers really split the stream
        assert all(a.json()["checksum"] == sent.checksum for a in answers)
        assert await group.checksums() == [named_checksum(named)] * 3
    health = (await group.http.get(group.daemons[0].url + "/healthz")).json()
    assert health["weight_version"] == "3" and health["phase"] == "ready"


async def test_manifest_mismatch_fails_everywhere_and_changes_nothing(group):
    good = _model(seed=1)
    await group.round(lambda: group.sender.send_weights(good), 1)
    before = await group.checksums()

    wrong = [(n, t) for n, t in _model(seed=2)]
    wrong[2] = ("layer.0.bias", torch.randn(65).half())  # one shape off
    sent, answers = await group.round(lambda: group.sender.send_weights(wrong), 2)
    assert isinstance(sent, ManifestMismatch) and "'layer.0.bias'" in str(sent)
    for answer in answers:
        assert answer.status_code == 422 and "'layer.0.bias'" in answer.json()["detail"]
    assert await group.checksums() == before

    unknown = _model(seed=2) + [("lora.A", torch.zeros(4))]
    sent, answers = await group.round(lambda: group.sender.send_weights(unknown), 2)
    assert isinstance(sent, ManifestMismatch) and "'lora.A'" in str(sent)
    assert await group.checksums() == before

    # The group is still usable: the next round lands everywhere.
    nxt = _model(seed=3)
    sent, answers = await group.round(lambda: group.sender.send_weights(nxt), 3)
    assert not isinstance(sent, BaseException)
    assert await group.checksums() == [named_checksum(nxt)] * 3


async def test_update_info_from_the_http_body_must_match_the_trainer(group):
    named = _model(seed=1)
    await group.round(lambda: group.sender.send_weights(named), 1)
    before = await group.checksums()
    body = {"names": [n for n, _ in named], "dtype_names": ["float32"] * len(named),
            "shapes": [list(t.shape) for _, t in named]}
    sent, answers = await group.round(lambda: group.sender.send_weights(_model(seed=5)), 2, body)
    assert isinstance(sent, ManifestMismatch)
    assert all(a.status_code == 422 and "'embed.weight'" in a.json()["detail"] for a in answers)
    assert await group.checksums() == before


async def test_sparse_patches_apply_in_place(group):
    named = _model(seed=1)
    await group.round(lambda: group.sender.send_weights(named), 1)
    indices = torch.tensor([0, 17, 4095], dtype=torch.int64)
    values = torch.tensor([1.0, -2.0, 3.5], dtype=torch.float32)
    sent, answers = await group.round(
        lambda: group.sender.send_sparse([SparsePatch("layer.0.weight", indices, values)]), 2,
        {"update_kind": "sparse_flat"})
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    expected = dict(named)
    expected["layer.0.weight"] = expected["layer.0.weight"].clone()
    expected["layer.0.weight"].view(-1)[indices] = values
    assert await group.checksums() == [named_checksum(expected.items())] * 3

    before = await group.checksums()
    bad = SparsePatch("layer.0.weight", torch.tensor([5, 64 * 64]), torch.tensor([9.0, 9.0]))
    sent, answers = await group.round(lambda: group.sender.send_sparse([bad]), 3)
    assert isinstance(sent, Exception) and "out of range" in str(sent)
    assert all(a.status_code == 503 for a in answers)
    assert await group.checksums() == before  # validated before any patch applied
