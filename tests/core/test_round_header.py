"""The round header over a real gloo group (threads of this process): a header every receiver
already agreed to travels as its name only; a receiver that does not hold it refuses the round,
nothing changes, and the next round carries the whole header again."""

from __future__ import annotations

import threading

import torch

from weightsync import InitInfo, ManifestMismatch, UpdateInfo, WeightSender, WeightStore
from weightsync.transports import get_transport


def _weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(f"layer.{i}.weight", torch.randn(64, 33, generator=gen)) for i in range(5)]


def test_a_repeated_header_is_named_and_an_unknown_name_is_refused(rendezvous_port):
    base = {"backend": "cpu", "master_address": "127.0.0.1", "master_port": rendezvous_port,
            "world_size": 2, "timeout_seconds": 20}
    store = WeightStore.from_tensors([(n, torch.zeros_like(t)) for n, t in _weights(0)])
    rounds = 4
    seen: list[bytes] = []
    outcomes: list[object] = []
    checksums: list[str] = []
    ready = threading.Event()

    def receiver():
        transport = get_transport("cpu").connect(InitInfo(**base, rank_offset=1), 1)
        headers = transport.receiver.headers
        parse = headers.decode
        headers.decode = lambda data: (seen.append(data), parse(data))[1]
        ready.set()
        try:
            for number in range(rounds):
                if number == 2:
                    headers.forget()  # as if this receiver never saw the last header
                try:
                    outcomes.append(transport.receive(store, UpdateInfo()))
                except Exception as error:  # noqa: BLE001 - the test inspects it
                    outcomes.append(error)
                checksums.append(store.checksum())
        finally:
            transport.close()

    thread = threading.Thread(target=receiver)
    thread.start()
    sender = WeightSender.init(base)
    try:
        assert ready.wait(30)
        sent = []
        for number in range(rounds):
            try:
                sent.append(sender.send_weights(_weights(number + 1)))
            except ManifestMismatch as error:
                sent.append(error)
        thread.join(60)
    finally:
        sender.close()
    assert b"repeat_of" not in seen[0] and b"layer.4.weight" in seen[0]  # the whole header
    assert b"repeat_of" in seen[1] and len(seen[1]) < 200  # its name only
    assert b"repeat_of" in seen[2] and isinstance(outcomes[2], ManifestMismatch)
    assert isinstance(sent[2], ManifestMismatch) and "does not hold" in str(sent[2])
    assert checksums[2] == checksums[1]  # the refused round changed nothing
    assert b"repeat_of" not in seen[3]  # after a refusal the whole header goes again
    assert sent[3].checksum == outcomes[3].checksum
    assert checksums[3] == WeightStore.from_tensors(_weights(4)).checksum()
