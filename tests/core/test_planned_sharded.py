"""The public sharded API sends a planned round (issue 22 item 1): no rank gathers.

Real processes (tests/helpers/planned_sharded_party.py): an FSDP2 trainer of 2 ranks, each
joined with `WeightSender.init(init_info, sharded=True)` and sending
`send_weights(ModuleSource(model))` as users do today, `DTensor.full_tensor` patched to raise;
2 receivers joined with `get_transport("cpu").connect(init_info, rank)`. The only difference
from a gathering group is `init_info.trainer_ranks`. Then the same trainer with a real daemon
process (`python -m weightsync_daemon`, its weights shaped by `--manifest`) as the receiver,
driven over HTTP as a coordinator does.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from helpers.json_lines import JsonLinesProcess
from helpers.planned_sharded_party import full_weights
from weightsync import InitInfo, UpdateInfo, WeightStore
from weightsync.dtypes import dtype_name
from weightsync.errors import WeightSyncError
from weightsync.planned_api import PlannedReceiver, trainer_party
from weightsync.store import tensor_digest
from weightsync_operator.local import free_port

HELPER = Path(__file__).resolve().parents[1] / "helpers" / "planned_sharded_party.py"
TIMEOUT_S = 15.0
RANKS, RECEIVERS = 2, 2


class Party(JsonLinesProcess):
    """One helper process (HELPER), spoken to in JSON lines."""

    script = HELPER


@pytest.mark.integration
def test_a_sharded_trainer_through_the_public_api_sends_from_every_rank_without_gathering():
    """Two rounds: every receiver lands every tensor bit-exact, both trainer ranks send (each about
    half of the model), and no rank called `full_tensor` (it raises in each of them)."""
    port, trainer_port = free_port(), free_port()
    init = json.dumps({"backend": "cpu", "master_address": "127.0.0.1", "master_port": port,
                       "world_size": RANKS + RECEIVERS, "trainer_ranks": RANKS, "timeout_seconds": TIMEOUT_S,
                       "init_timeout_seconds": 60, "packed_buffer_size_bytes": 4096, "packed_num_buffers": 2})
    trainers = [Party("trainer", "--rank", str(r), "--ranks", str(RANKS), "--trainer-port", str(trainer_port),
                      "--init", init, "--timeout", str(TIMEOUT_S)) for r in range(RANKS)]
    receivers = [Party("receiver", "--rank", str(RANKS + r), "--init", init) for r in range(RECEIVERS)]
    try:
        ready = [p.next(120) for p in trainers + receivers]
        assert all(r["ready"] for r in ready), ready
        assert all(r["planned"] and r["dtensors"] == 6 for r in ready[:RANKS]), ready
        assert all(r["transport"] == "PlannedReceiver" for r in ready[RANKS:]), ready
        for step in (1, 2):
            for receiver in receivers:
                receiver.send(cmd="receive")
            for trainer in trainers:
                trainer.send(cmd="round", step=step)
            sent = [t.next() for t in trainers]
            received = [r.next() for r in receivers]
            assert all(s["ok"] and s["planned"] for s in sent), sent
            assert all(r["ok"] for r in received), received
            expected = {name: tensor_digest(t) for name, t in full_weights(step).items()}
            assert [r["digests"] for r in received] == [expected] * RECEIVERS
            per_rank = {int(rank): nbytes for rank, nbytes in sent[0]["sent"].items()}
            total = sum(per_rank.values())
            assert [s["moved"] for s in sent] == [per_rank[rank] for rank in range(RANKS)]
            assert all(nbytes > 0 for nbytes in per_rank.values()), per_rank
            assert sum(r["moved"] for r in received) == total
            print(f"\n[public sharded API, round {step}] bytes sent per trainer rank {per_rank}, "
                  f"received per receiver {[r['moved'] for r in received]}", file=sys.stderr)
        assert not any("full_tensor" in "".join(p.errors) for p in trainers)
    finally:
        for party in trainers + receivers:
            party.stop()


def _start_daemon(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"tensors": [{"name": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
                                                for name, t in full_weights(0).items()]}))
    daemon = subprocess.Popen([sys.executable, "-m", "weightsync_daemon", "--port", "0", "--backend", "cpu",
                               "--exit-on-stdin-eof", "--manifest", str(manifest)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=(tmp_path / "daemon.log").open("wb"))
    line = daemon.stdout.readline()
    assert line, (tmp_path / "daemon.log").read_text()
    return daemon, json.loads(line)["url"]


def _post(http: httpx.Client, url: str, body: dict | None = None, wait: bool = True):
    """POST now; with `wait` False, on a thread (the call blocks while the group forms or moves)."""
    if wait:
        answer = http.post(url, json=body or {})
        assert answer.status_code == 200, answer.text
        return answer.json()
    result: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: result.append(http.post(url, json=body or {})))
    thread.start()
    return thread, result


def _joined(thread: threading.Thread, result: list) -> None:
    thread.join(90)
    assert result and result[0].status_code == 200, result[0].text if result else "no answer"


@pytest.mark.integration
def test_a_daemon_receives_a_planned_round_from_a_sharded_trainer(tmp_path):
    """Two FSDP2 ranks (full_tensor raising) and one daemon: an init placing the daemon among the
    trainer's ranks is refused (422); the daemon joins as rank 2 of 3 (`trainer_ranks` 2), takes
    two rounds over its HTTP phases and holds every tensor bit-exact; both trainer ranks sent
    part of it."""
    daemon, url = _start_daemon(tmp_path)
    port, trainer_port = free_port(), free_port()
    info = {"backend": "cpu", "master_address": "127.0.0.1", "master_port": port, "world_size": RANKS + 1,
            "trainer_ranks": RANKS, "timeout_seconds": TIMEOUT_S, "init_timeout_seconds": 60,
            "packed_buffer_size_bytes": 4096, "packed_num_buffers": 2}
    trainers = [Party("trainer", "--rank", str(r), "--ranks", str(RANKS), "--trainer-port", str(trainer_port),
                      "--init", json.dumps(info), "--timeout", str(TIMEOUT_S)) for r in range(RANKS)]
    try:
        with httpx.Client(timeout=90) as http:
            refused = http.post(url + "/init_weight_transfer_engine", json={"init_info": {**info, "rank_offset": 1}})
            assert refused.status_code == 422 and "receivers start at 2" in refused.text, refused.text
            _joined(*_post(http, url + "/init_weight_transfer_engine",
                           {"init_info": {**info, "rank_offset": RANKS}}, wait=False))
            assert all(t.next(120)["planned"] for t in trainers)
            for step in (1, 2):
                _post(http, url + "/start_weight_update")
                update = _post(http, url + "/update_weights", wait=False)
                for trainer in trainers:
                    trainer.send(cmd="round", step=step)
                sent = [t.next() for t in trainers]
                _joined(*update)
                assert all(s["ok"] and s["planned"] and s["moved"] > 0 for s in sent), sent
                _post(http, url + "/finish_weight_update", {"weight_version": f"v{step}"})
                checked = _post(http, url + "/weight_checker", {"action": "checksum"})
                expected = {name: tensor_digest(t) for name, t in full_weights(step).items()}
                assert checked["checksums"] == expected and checked["weight_version"] == f"v{step}"
                print(f"\n[daemon, round {step}] bytes sent per trainer rank {[s['moved'] for s in sent]}",
                      file=sys.stderr)
    finally:
        for trainer in trainers:
            trainer.stop()
        daemon.stdin.close()
        try:
            daemon.wait(20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def _init(**fields) -> InitInfo:
    return InitInfo(master_address="127.0.0.1", master_port=29500, world_size=4, **fields)


def test_a_sharded_trainer_without_trainer_ranks_gathers_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="weightsync.planned"):
        assert trainer_party(_init(), "cpu", SimpleNamespace(rank=0, size=2)) is None
    assert "init_info has no trainer_ranks" in caplog.text and "rank 0 alone sends" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="weightsync.planned"):  # said once, by rank 0
        assert trainer_party(_init(), "cpu", SimpleNamespace(rank=1, size=2)) is None
    assert caplog.text == ""


def test_trainer_ranks_that_cannot_be_planned_are_refused_at_init():
    with pytest.raises(WeightSyncError, match="trainer group has 2 ranks"):
        trainer_party(_init(trainer_ranks=3), "cpu", SimpleNamespace(rank=0, size=2))
    with pytest.raises(WeightSyncError, match="cpu backend only, not 'nccl'"):
        trainer_party(_init(trainer_ranks=2), "nccl", SimpleNamespace(rank=0, size=2))
    with pytest.raises(WeightSyncError, match="rank 1 is not a receiver"):
        PlannedReceiver.connect(_init(trainer_ranks=2), 1)


def test_a_planned_receiver_needs_a_store_holding_every_tensor():
    receiver = PlannedReceiver.__new__(PlannedReceiver)  # the check comes before any group is used
    with pytest.raises(WeightSyncError, match="an empty store"):
        receiver.receive(WeightStore.empty(), UpdateInfo())


def test_a_daemon_refuses_a_planned_init_it_cannot_take():
    """Before joining (422 over HTTP): a receiver daemon without shaped weights (it states its
    needs from them), one on another backend, and the trainer's agent (it sends alone)."""
    import torch

    from weightsync.dtypes import tensors_manifest
    from weightsync.errors import ProtocolError
    from weightsync_daemon.service import ReceiverService, SenderService

    info = _init(trainer_ranks=2, rank_offset=2)
    with pytest.raises(ProtocolError, match="shape them up front"):
        ReceiverService(backend="cpu")._check_rank(info)
    shaped = WeightStore.from_manifest(tensors_manifest([("w", torch.zeros(3))]))
    ReceiverService(store=shaped, backend="cpu")._check_rank(info)  # takes it
    with pytest.raises(ProtocolError, match="cpu backend only"):
        ReceiverService(store=shaped, backend="nccl", device="cpu")._check_rank(info)
    with pytest.raises(ProtocolError, match="sends alone"):
        SenderService(source=list, backend="cpu")._check_rank(_init(trainer_ranks=2))
