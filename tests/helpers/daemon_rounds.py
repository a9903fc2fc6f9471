"""A daemon process and a gloo trainer in the test's process, driven round by round over HTTP:
the pieces the daemon's hardening tests share (weights, bodies, a joined group, a full round, a
trainer held midway, a refused round)."""

import asyncio
import threading

import torch

from weightsync import WeightSender
from weightsync.errors import ManifestMismatch
from weightsync_operator.local import free_port

TIMEOUT = 20.0  # the group's collective timeout
HOLD = 12.0  # the longest a test holds the trainer mid-round
TOKEN = "hardening-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(f"layer{i}.weight", torch.randn(128, 128, generator=gen)) for i in range(16)]


def manifest(named) -> dict:
    return {"names": [n for n, _ in named], "dtype_names": ["float32"] * len(named),
            "shapes": [list(t.shape) for _, t in named]}


def init_info(port: int, world: int, **extra) -> dict:
    return {"master_address": "127.0.0.1", "master_port": port, "world_size": world, "timeout_seconds": TIMEOUT,
            "packed_buffer_size_bytes": 16384, "packed_num_buffers": 2, "group_name": f"g{port}", **extra}


class Held:
    """Holds the trainer mid-round: after `after` chunks its next broadcast waits until `release()`
    (at most HOLD seconds, under the group's timeout), so the receivers' /update_weights is
    surely in flight meanwhile; `midway` is set once it holds."""

    def __init__(self, sender: WeightSender, after: int = 4):
        self.group = sender.transport.group
        self.original, self.after = self.group.broadcast, after
        self.count, self.midway, self._released = 0, threading.Event(), threading.Event()
        self.group.broadcast = self._broadcast

    def _broadcast(self, tensor, src=0):
        self.count += 1
        if self.count == self.after:
            self.midway.set()
            self._released.wait(HOLD)
        return self.original(tensor, src)

    def release(self) -> None:
        self._released.set()
        self.group.broadcast = self.original


async def wait_for(event: threading.Event, timeout: float) -> None:
    assert await asyncio.to_thread(event.wait, timeout), "the event did not happen in time"


async def round_held_midway(http, daemon, sender: WeightSender):
    """Round 2 started on `daemon`, its /update_weights in flight and the trainer held midway
    through sending `weights(2)`: (the hold, the update request, the send)."""
    held = Held(sender)
    assert (await http.post(daemon.url + "/start_weight_update")).status_code == 200
    update = asyncio.ensure_future(http.post(daemon.url + "/update_weights", json={}))
    sending = asyncio.ensure_future(asyncio.to_thread(sender.send_weights, weights(2)))
    await wait_for(held.midway, 20)
    return held, update, sending


async def joined(http, daemons, world: int, headers=None, **extra):
    """A trainer (this process) and `daemons` in a fresh group."""
    port = free_port()
    sender, *answers = await asyncio.gather(
        asyncio.to_thread(WeightSender.init, init_info(port, world, **extra)),
        *(http.post(d.url + "/init_weight_transfer_engine", headers=headers,
                    json={"init_info": init_info(port, world, rank_offset=i + 1, **extra)})
          for i, d in enumerate(daemons)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return sender


async def full_round(http, daemons, sender, named, version, bodies=None, headers=None):
    for d in daemons:
        assert (await http.post(d.url + "/start_weight_update", headers=headers)).status_code == 200
    _, *updates = await asyncio.gather(
        asyncio.to_thread(sender.send_weights, named),
        *(http.post(d.url + "/update_weights", headers=headers, json=(bodies[i] if bodies else {}))
          for i, d in enumerate(daemons)))
    assert all(u.status_code == 200 for u in updates), [u.text for u in updates]
    for d in daemons:
        done = await http.post(d.url + "/finish_weight_update", headers=headers, json={"weight_version": version})
        assert done.status_code == 200, done.text


async def state(http, daemon, headers=None) -> tuple[str, dict]:
    checksum = (await http.post(daemon.url + "/weight_checker", headers=headers,
                                json={"action": "checksum"})).json()["checksum"]
    return checksum, (await http.get(daemon.url + "/healthz")).json()


async def refused_round(http, daemon, send, body, headers=None):
    """A round in which `daemon` refuses its /update_weights `body` while the trainer sends
    (`send()`, on a thread): (the daemon's answer, the ManifestMismatch the trainer raised)."""
    assert (await http.post(daemon.url + "/start_weight_update", headers=headers)).status_code == 200

    async def trainer() -> ManifestMismatch:
        try:
            await asyncio.to_thread(send)
        except ManifestMismatch as error:
            return error
        raise AssertionError("the trainer's round succeeded although the daemon refused its body")

    post = (http.post(daemon.url + "/update_weights", headers=headers, json=body) if not isinstance(body, bytes)
            else http.post(daemon.url + "/update_weights", content=body,
                           headers={**(headers or {}), "content-type": "application/json"}))
    error, answer = await asyncio.gather(trainer(), post)
    return answer, error
