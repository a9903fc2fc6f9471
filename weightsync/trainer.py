"""Trainer-side API: join the transfer group as rank 0, then send weights each round."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from weightsync.protocol import InitInfo, parse
from weightsync.transports import RoundStats, SparsePatch, Transport, default_device, get_transport


class WeightSender:
    """The trainer's end of a transfer group.

    >>> sender = WeightSender.init({"backend": "cpu", "master_address": "127.0.0.1",
    ...                             "master_port": 29600, "world_size": 3})   # doctest: +SKIP
    >>> sender.send_weights(model.named_parameters())                           # doctest: +SKIP
    """

    def __init__(self, transport: Transport):
        self.transport = transport

    @classmethod
    def init(cls, init_info: InitInfo | dict, backend: str | None = None,
             device: torch.device | str | None = None) -> "WeightSender":
        """Host the rendezvous and wait (up to the init timeout) for every receiver to join."""
        info = init_info if isinstance(init_info, InitInfo) else parse(InitInfo, init_info, "init_info")
        name = backend or info.backend or "cpu"
        transport_cls = get_transport(name)
        target = torch.device(device) if device is not None else default_device(name)
        return cls(transport_cls.connect(info, 0, target))

    def send_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> RoundStats:
        """Send every (name, tensor) to every receiver; returns what moved. The manifest is
        checked by all receivers first, so a mismatch raises ManifestMismatch and changes nothing."""
        with torch.no_grad():
            return self.transport.send(named_tensors)

    def send_sparse(self, patches: Iterable[SparsePatch]) -> RoundStats:
        with torch.no_grad():
            return self.transport.send_sparse(patches)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> "WeightSender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

