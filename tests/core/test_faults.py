"""Fault injection with real processes: a receiver killed or frozen mid-transfer, the trainer
killed mid-transfer. Every survivor returns within its timeout, keeps its version (atomic
receivers keep every byte), and the next round succeeds."""

import asyncio
import json
import os
import pathlib
import signal
import sys
import time

import pytest

from weightsync import TransferError, WeightSender
from weightsync.store import named_checksum
from weightsync_operator.local import free_port

from helpers.slow_trainer import slowed, weights

pytestmark = pytest.mark.faults

HELPERS = pathlib.Path(__file__).resolve().parents[1] / "helpers"

TIMEOUT = 4.0  # the group's collective timeout: how long a survivor may wait for a lost peer


def init_info(port: int, world: int, **extra) -> dict:
    return {"master_address": "127.0.0.1", "master_port": port, "world_size": world, "timeout_seconds": TIMEOUT,
            "packed_buffer_size_bytes": 16384, "packed_num_buffers": 2, **extra}


async def init_daemons(http, daemons, port, world, atomic_first=True):
    """Init each daemon (the first atomic, the rest not) into a fresh group."""
    calls = [http.post(d.url + "/init_weight_transfer_engine", json={"init_info": init_info(
        port, world, rank_offset=i + 1, atomic=atomic_first and i == 0, group_name=f"g{port}")})
        for i, d in enumerate(daemons)]
    return calls


async def post_all(http, daemons, path, body=None):
    """POST to every daemon at once; a daemon that died answers with its exception."""
    return await asyncio.gather(*(http.post(d.url + path, json=body or {}) for d in daemons),
                                return_exceptions=True)


async def state(http, daemon):
    checksum = (await http.post(daemon.url + "/weight_checker", json={"action": "checksum"})).json()["checksum"]
    return checksum, (await http.get(daemon.url + "/healthz")).json()


async def fresh_round_succeeds(http, daemons, version):
    """A new trainer and a new group over the survivors: the next version lands everywhere."""
    port = free_port()
    sender, *answers = await asyncio.gather(
        asyncio.to_thread(WeightSender.init, init_info(port, len(daemons) + 1, group_name=f"g{port}")),
        *await init_daemons(http, daemons, port, len(daemons) + 1))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    await post_all(http, daemons, "/start_weight_update")
    named = weights(version)
    _, updates = await asyncio.gather(asyncio.to_thread(sender.send_weights, named),
                                      post_all(http, daemons, "/update_weights"))
    assert all(u.status_code == 200 for u in updates), [u.text for u in updates]
    await post_all(http, daemons, "/finish_weight_update", {"weight_version": version})
    for daemon in daemons:
        checksum, health = await state(http, daemon)
        assert checksum == named_checksum(named) and health["weight_version"] == str(version)
        assert health["weights_intact"] and health["phase"] == "ready"
    sender.close()


@pytest.mark.parametrize("fault", ["kill", "freeze"])
async def test_receiver_lost_mid_transfer(spawn, http, fault):
    daemons = await asyncio.gather(*(spawn(f"daemon-{i}") for i in range(3)))
    survivors, victim = daemons[:2], daemons[2]
    port = free_port()
    sender, *answers = await asyncio.gather(
        asyncio.to_thread(WeightSender.init, init_info(port, 4, group_name=f"g{port}")),
        *await init_daemons(http, daemons, port, 4))
    assert all(a.status_code == 200 for a in answers)
    await post_all(http, daemons, "/start_weight_update")
    await asyncio.gather(asyncio.to_thread(sender.send_weights, weights(1)), post_all(http, daemons, "/update_weights"))
    await post_all(http, daemons, "/finish_weight_update", {"weight_version": 1})
    before = [await state(http, d) for d in survivors]

    broadcasts = slowed(sender.transport.group, 0.03)
    await post_all(http, daemons, "/start_weight_update")
    receiving = asyncio.ensure_future(post_all(http, daemons, "/update_weights"))
    sending = asyncio.ensure_future(asyncio.to_thread(sender.send_weights, weights(2)))
    # A dozen chunks in (the round has some 64 at 16 KiB each): the plain receiver holds part of it.
    assert await asyncio.to_thread(broadcasts.wait_for, 12, 30), "the round never got a dozen chunks in"
    assert not sending.done()
    os.kill(victim.process.pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    began = time.monotonic()
    try:
        with pytest.raises(TransferError):
            await asyncio.wait_for(sending, TIMEOUT + 10)
        answers = await asyncio.wait_for(asyncio.shield(receiving), TIMEOUT + 10) if fault == "kill" else None
    finally:
        if fault == "freeze":
            os.kill(victim.process.pid, signal.SIGKILL)
    elapsed = time.monotonic() - began
    assert elapsed < TIMEOUT + 8, elapsed
    if answers is None:
        answers = await asyncio.wait_for(receiving, TIMEOUT + 10)
    assert [a.status_code for a in answers[:2]] == [503, 503], [a.text for a in answers]
    (atomic_sum, atomic_health), (plain_sum, plain_health) = [await state(http, d) for d in survivors]
    assert atomic_sum == before[0][0]  # the atomic receiver kept every byte
    assert atomic_health["weights_intact"] and atomic_health["weight_version"] == "1"
    assert plain_health["weight_version"] == "1" and plain_health["phase"] == "ready"
    assert plain_health["weights_intact"] is False  # part of round 2 landed: reported, not hidden
    sender.close()
    await fresh_round_succeeds(http, survivors, 3)


async def test_trainer_killed_mid_transfer(spawn, http):
    daemons = await asyncio.gather(*(spawn(f"daemon-{i}") for i in range(2)))
    port = free_port()
    trainer = await asyncio.create_subprocess_exec(
        sys.executable, str(HELPERS / "slow_trainer.py"),
        "--init", json.dumps(init_info(port, 3, group_name=f"g{port}")),
        "--delay", "0.03", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        answers = await asyncio.gather(*await init_daemons(http, daemons, port, 3))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        await post_all(http, daemons, "/start_weight_update")
        await post_all(http, daemons, "/update_weights")
        assert "sent" in json.loads(await asyncio.wait_for(trainer.stdout.readline(), 30))
        await post_all(http, daemons, "/finish_weight_update", {"weight_version": 1})
        before = [await state(http, d) for d in daemons]
        assert before[0][0] == named_checksum(weights(1))

        await post_all(http, daemons, "/start_weight_update")
        receiving = asyncio.ensure_future(post_all(http, daemons, "/update_weights"))
        trainer.stdin.write(b"go\n")
        await trainer.stdin.drain()
        while json.loads(await asyncio.wait_for(trainer.stdout.readline(), 30)).get("broadcasts", 0) < 12:
            pass
        trainer.kill()
        began = time.monotonic()
        answers = await asyncio.wait_for(receiving, TIMEOUT + 10)
        assert time.monotonic() - began < TIMEOUT + 8
    finally:
        if trainer.returncode is None:
            trainer.kill()
        await trainer.wait()
    assert [a.status_code for a in answers] == [503, 503], [a.text for a in answers]
    (atomic_sum, atomic_health), (_, plain_health) = [await state(http, d) for d in daemons]
    assert atomic_sum == before[0][0] and atomic_health["weights_intact"]
    assert plain_health["weights_intact"] is False
    assert {atomic_health["weight_version"], plain_health["weight_version"]} == {"1"}
    await fresh_round_succeeds(http, daemons, 4)


def test_a_corrupted_byte_fails_the_round_and_atomic_receivers_keep_theirs(rendezvous_port):
    """In-process (threads): flip one byte on its way into one receiver; the checksum catches it."""
    import threading

    from weightsync import InitInfo, UpdateInfo, WeightStore
    from weightsync.errors import IntegrityError
    from weightsync.transports import get_transport

    named = weights(1)
    base = init_info(rendezvous_port, 3, timeout_seconds=20)
    stores = [WeightStore.from_tensors([(n, t.clone()) for n, t in named]) for _ in range(2)]
    before = [s.checksum() for s in stores]
    errors = {}

    def receive(rank):
        transport = get_transport("cpu").connect(InitInfo(**{**base, "rank_offset": rank, "atomic": True}), rank)
        if rank == 2:  # corrupt the 5th payload chunk after it arrives
            original, seen = transport.group.broadcast, {"n": 0}

            def corrupting(tensor, src=0):
                pending = original(tensor, src)
                seen["n"] += 1
                if seen["n"] == 7:  # 2 header broadcasts, then payload chunks
                    pending.wait()
                    tensor[100] ^= 0xFF
                return pending
            transport.group.broadcast = corrupting
        try:
            transport.receive(stores[rank - 1], UpdateInfo())
        except Exception as error:  # noqa: BLE001 - the test inspects it
            errors[rank] = error
        transport.close()

    threads = [threading.Thread(target=receive, args=(r,)) for r in (1, 2)]
    [t.start() for t in threads]
    sender = WeightSender.init(base)
    with pytest.raises(TransferError, match="checksum mismatch"):
        sender.send_weights(weights(2))
    [t.join(30) for t in threads]
    sender.close()
    assert isinstance(errors[2], IntegrityError) and "checksum mismatch" in str(errors[2])
    assert isinstance(errors[1], TransferError) and "rank 2" in str(errors[1])
    assert [s.checksum() for s in stores] == before  # atomic: nothing switched in anywhere
