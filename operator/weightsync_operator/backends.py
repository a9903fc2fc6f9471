"""What the control plane knows about a transport without loading it.

The coordinator drives rounds over HTTP and never imports the data plane (`weightsync.transports`
pulls torch and the GPU code, which the operator's image need not carry). The one fact about a
transport it needs is whether the targets must first get something from the trainer's answer
(ipc/p2p: the trainer answers `update` with IPC handles, relayed to every target) or receive
while the trainer sends (cpu, nccl: every party's `update` at once). This table says so;
tests/project/test_layers.py checks it against each built-in transport's `needs_trainer_update_info`.
"""

from __future__ import annotations

# Backends whose targets receive from the trainer's `update_info` (the trainer answers first).
RELAYED_BACKENDS: frozenset[str] = frozenset({"ipc", "p2p"})


def relays_update_info(backend: str) -> bool:
    """Whether a round on `backend` asks the trainer first and relays its `update_info` to the
    targets. An unknown backend is driven like a collective one: its parties name the problem."""
    return backend in RELAYED_BACKENDS
