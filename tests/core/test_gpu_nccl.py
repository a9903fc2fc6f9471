"""nccl on 2 GPUs: the trainer here on cuda:0, a real daemon process on cuda:1; plus in-process
groups for what a daemon cannot show (two groups in one process, a trainer-minted id, a peer
that never answers)."""

from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

from helpers.gpu import collective_round, expected, joined_pair, need_gpus, weight_set
from weightsync import InitInfo, ManifestMismatch, SparsePatch, TransferError, UpdateInfo, WeightSender, WeightStore
from weightsync.store import named_checksum
from weightsync.transports import get_transport
from weightsync.transports.nccl_lib import new_unique_id
from weightsync_operator.local import free_port

pytestmark = pytest.mark.gpu
BUFFER = 1 << 20  # small buffers: the 4 MB tensor spans several, the ramp has steps


@pytest.fixture(scope="module")
def group():
    need_gpus(2)
    with joined_pair("nccl", "cuda:1", BUFFER, 3) as (daemon, sender):
        yield daemon, sender


def test_dense_rounds_are_bit_exact_and_land_in_place(group):
    daemon, sender = group
    for version in range(1, 4):
        named = weight_set(version, "cuda:0")
        sent, answer = collective_round(daemon, lambda named=named: sender.send_weights(named), version)
        assert answer.status_code == 200, answer.text
        assert answer.json()["checksum"] == sent.checksum and answer.json()["in_place"]
        assert sent.num_chunks > 4  # the small buffers really split (and ramp) the stream
        assert sent.direct  # contiguous tensors on the trainer's GPU: nothing packed
        assert daemon.checksum() == expected(named)


def test_packed_rounds_move_the_same_bytes_as_direct_ones(group):
    """A non-contiguous tensor makes the trainer pack the round (the receiver follows the
    header); so does the init option `packed` (agreed by both parties). Either way the bytes and
    the checksum are the direct round's."""
    daemon, sender = group
    named = weight_set(21, "cuda:0")
    direct, answer = collective_round(daemon, lambda: sender.send_weights(named), 21)
    assert answer.status_code == 200 and direct.direct
    strided = list(named)
    name, tensor = strided[3]
    strided[3] = (name, tensor.t().contiguous().t())  # same values and shape, column-major
    assert not strided[3][1].is_contiguous()
    packed, answer = collective_round(daemon, lambda: sender.send_weights(strided), 22)
    assert answer.status_code == 200, answer.text
    assert not packed.direct and packed.checksum == direct.checksum
    assert daemon.checksum() == expected(named)
    base = {"master_address": "127.0.0.1", "master_port": free_port(), "world_size": 2,
            "packed_buffer_size_bytes": BUFFER, "packed_num_buffers": 2, "timeout_seconds": 60,
            "options": {"packed": True}}
    store = separate_tensors()
    with in_process_pair(base) as (packing, receiver, pool):
        got = pool.submit(receiver.receive, store, UpdateInfo())
        forced = packing.send_weights(named)
        assert got.result(timeout=120).checksum == forced.checksum
    assert not forced.direct and forced.checksum == direct.checksum
    assert store.checksum() == expected(named)


def test_sparse_patches_apply(group):
    daemon, sender = group
    named = weight_set(7, "cuda:0")
    collective_round(daemon, lambda: sender.send_weights(named), 7)
    indices = torch.tensor([0, 999, 512 * 1024 - 1], dtype=torch.int64, device="cuda:0")
    values = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16, device="cuda:0")
    sent, answer = collective_round(daemon,
                                    lambda: sender.send_sparse([SparsePatch("lm_head.weight", indices, values)]),
                                    8, {"update_kind": "sparse_flat"})
    assert answer.status_code == 200, answer.text
    patched = dict(named)
    patched["lm_head.weight"] = patched["lm_head.weight"].clone()
    patched["lm_head.weight"].view(-1)[indices] = values
    assert daemon.checksum() == named_checksum(patched.items())

    before = daemon.checksum()
    bad = SparsePatch("lm_head.weight", torch.tensor([3, 512 * 1024], device="cuda:0"),
                      torch.ones(2, dtype=torch.bfloat16, device="cuda:0"))
    sent, answer = collective_round(daemon, lambda: sender.send_sparse([bad]), 9)
    assert isinstance(sent, TransferError) and "out of range" in str(sent)
    assert answer.status_code == 503 and daemon.checksum() == before


def test_manifest_mismatch_names_the_parameter_and_changes_nothing(group):
    daemon, sender = group
    named = weight_set(11, "cuda:0")
    collective_round(daemon, lambda: sender.send_weights(named), 11)
    before = daemon.checksum()
    wrong = list(weight_set(12, "cuda:0"))
    wrong[4] = ("layer.0.norm", torch.zeros(334, dtype=torch.float16, device="cuda:0"))
    sent, answer = collective_round(daemon, lambda: sender.send_weights(wrong), 12)
    assert isinstance(sent, ManifestMismatch) and "'layer.0.norm'" in str(sent)
    assert answer.status_code == 422 and "'layer.0.norm'" in answer.json()["detail"]
    assert daemon.checksum() == before
    again = weight_set(13, "cuda:0")  # the group stays usable
    sent, answer = collective_round(daemon, lambda: sender.send_weights(again), 13)
    assert answer.status_code == 200 and daemon.checksum() == expected(again)


@contextmanager
def in_process_pair(base: dict):
    """A trainer on cuda:0 and a receiver transport on cuda:1 in this process, and a pool to
    run the receiver's side of each round in."""
    with ThreadPoolExecutor(1) as pool:
        joined = pool.submit(get_transport("nccl").connect, InitInfo(**base, rank_offset=1), 1, torch.device("cuda:1"))
        sender = WeightSender.init({**base, "backend": "nccl"}, device="cuda:0")
        receiver = joined.result(timeout=120)
        try:
            yield sender, receiver, pool
        finally:
            sender.close()
            receiver.close()


def separate_tensors() -> WeightStore:
    return WeightStore.from_tensors([(n, torch.zeros_like(t, device="cuda:1")) for n, t in weight_set(0, "cuda:0")])


def test_a_second_group_in_the_same_process_with_a_trainer_minted_id(group):
    """Beside the module's group: a group from `nccl_unique_id_b64` (no rendezvous store), whose
    receiver keeps separate tensors (staging + unpack, not in place)."""
    need_gpus(2)
    base = {"nccl_unique_id_b64": base64.b64encode(new_unique_id()).decode(), "world_size": 2,
            "packed_buffer_size_bytes": BUFFER, "packed_num_buffers": 2, "timeout_seconds": 60}
    store = separate_tensors()
    with in_process_pair(base) as (sender, receiver, pool):
        for version in (1, 2):
            named = weight_set(100 + version, "cuda:0")
            got = pool.submit(receiver.receive, store, UpdateInfo())
            sent = sender.send_weights(named)
            stats = got.result(timeout=120)
            assert stats.checksum == sent.checksum and not stats.in_place and stats.direct
            assert store.checksum() == expected(named)


def test_the_lead_chunk_moves_the_same_bytes_and_a_receiver_without_the_header_drains_it():
    """The first chunk travels while the group agrees (into scratch, placed after the agreement):
    the round equals one without it (the init option lead: false), packed or direct. A receiver
    that does not hold the header the trainer names still takes the lead chunk part, refuses the
    round with its weights unchanged, and the next round (whole header) applies."""
    need_gpus(2)
    base = {"master_address": "127.0.0.1", "world_size": 2,
            "packed_buffer_size_bytes": BUFFER, "packed_num_buffers": 2, "timeout_seconds": 30}
    store = separate_tensors()

    def round_(named):
        got = pool.submit(receiver.receive, store, UpdateInfo())
        try:
            sent = sender.send_weights(named)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            sent = error
        try:
            return sent, got.result(timeout=120)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            return sent, error

    named = weight_set(31, "cuda:0")
    checksums = {}
    for lead, packed in ((True, False), (False, False), (True, True), (False, True)):
        options = {"lead": lead, "packed": packed}  # agreed by both parties at init: a group each
        with in_process_pair({**base, "master_port": free_port(), "options": options}) as (sender, receiver, pool):
            sent, got = round_(named)
            assert got.checksum == sent.checksum and sent.direct != packed
            assert store.checksum() == expected(named)
            checksums[lead, packed] = sent.checksum
    assert len(set(checksums.values())) == 1
    with in_process_pair({**base, "master_port": free_port()}) as (sender, receiver, pool):
        for seed in (32, 33):  # the second round names the header the first one agreed to
            sent, got = round_(weight_set(seed, "cuda:0"))
            assert got.checksum == sent.checksum
        receiver.receiver.headers.forget()  # as if this receiver never held it
        before = store.checksum()
        sent, got = round_(weight_set(34, "cuda:0"))
        assert isinstance(sent, ManifestMismatch) and isinstance(got, ManifestMismatch)
        assert "does not hold" in str(got) and store.checksum() == before
        again = weight_set(35, "cuda:0")
        sent, got = round_(again)
        assert got.checksum == sent.checksum and store.checksum() == expected(again)


def test_a_peer_that_never_answers_fails_the_trainer_within_the_timeout():
    need_gpus(2)
    base = {"master_address": "127.0.0.1", "master_port": free_port(), "world_size": 2,
            "packed_buffer_size_bytes": BUFFER, "timeout_seconds": 5}
    stop = threading.Event()
    joined = threading.Event()

    def silent_peer():
        transport = get_transport("nccl").connect(InitInfo(**base, rank_offset=1), 1, torch.device("cuda:1"))
        joined.set()
        stop.wait(60)
        transport.close()

    peer = threading.Thread(target=silent_peer, daemon=True)
    peer.start()
    sender = WeightSender.init({**base, "backend": "nccl"}, device="cuda:0")
    assert joined.wait(60)
    began = time.monotonic()
    with pytest.raises(TransferError, match="timed out"):
        sender.send_weights(weight_set(1, "cuda:0"))
    assert time.monotonic() - began < 20
    with pytest.raises(TransferError, match="aborted"):  # the aborted group says so, at once
        sender.send_weights(weight_set(1, "cuda:0"))
    stop.set()
    peer.join(30)
    sender.close()
