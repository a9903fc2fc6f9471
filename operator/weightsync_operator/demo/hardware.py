"""Which transport the demo uses, and where each of its processes runs, from the GPUs at hand."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    backend: str
    trainer_device: str | None  # None: the backend's default (the CPU for cpu)
    daemon_devices: list[str | None]


def choose_backend(requested: str, gpus: int, peer_access: bool) -> str:
    """`auto`: the fastest transport the hardware offers — p2p between two GPUs that can reach
    each other's memory (else nccl), ipc on a single GPU, cpu without one."""
    if requested != "auto":
        return requested
    if gpus >= 2:
        return "p2p" if peer_access else "nccl"
    return "ipc" if gpus == 1 else "cpu"


def place(requested: str, daemons: int) -> Placement:
    """The backend and the device of the trainer and of every daemon on this machine."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    peer = gpus >= 2 and torch.cuda.can_device_access_peer(1, 0)
    backend = choose_backend(requested, gpus, peer)
    if backend == "cpu":
        return Placement(backend, None, [None] * daemons)
    if gpus == 0:
        raise SystemExit(f"the {backend} backend needs a GPU, and none is visible")
    if backend == "ipc":  # every party on the one GPU, in its own process
        return Placement(backend, "cuda:0", ["cuda:0"] * daemons)
    if gpus < 2:
        raise SystemExit(f"the {backend} backend needs 2 GPUs (trainer and daemons apart); use ipc on one")
    if backend == "nccl" and daemons > gpus - 1:  # NCCL refuses two ranks of a group on one GPU
        raise SystemExit(f"the nccl backend puts every party on a GPU of its own: a trainer and {daemons} "
                         f"daemons need {daemons + 1} GPUs and {gpus} are visible; use --daemons {gpus - 1} "
                         f"or --backend p2p")
    return Placement(backend, "cuda:0", [f"cuda:{1 + i % (gpus - 1)}" for i in range(daemons)])
