"""weightsync as SGLang's weight-update wire: SGLang servers receive weightsync rounds.

SGLang runs every entry point of the group `sglang.srt.plugins` in each of its processes (HTTP
server, scheduler per tensor-parallel rank, detokenizer); `register()` is ours. It hooks SGLang's
own distributed-update path, so SGLang's routes and JSON bodies stay SGLang's:

    POST /init_weights_update_group        {"backend": "weightsync", "group_name": <InitInfo JSON>,
                                            "master_address", "master_port", "rank_offset", "world_size"}
    POST /update_weights_from_distributed  {"group_name": <InitInfo.group_name>, "names": [],
                                            "dtypes": [], "shapes": [], "weight_version": ...}

A body whose backend is not "weightsync", or whose group is not a weightsync one, goes to SGLang
unchanged. In a weightsync group each tensor-parallel worker is a receiver (rank `rank_offset +
its tp rank`) over a weightsync transport; the trainer's manifest is checked against the served
checkpoint before any byte moves, the stream checksum is verified, and tensors land through the
model's own `load_weights` (weightsync_sglang.worker). No pickle: SGLang's tensor route
(`/update_weights_from_tensor`) is not used.

Dependency direction: this package uses `weightsync` (core, transports); nothing in `weightsync/`
imports it. Importing it (or its trainer side, weightsync_sglang.trainer) does not import SGLang.
"""

from __future__ import annotations

from weightsync_sglang.wire import BACKEND_NAME
_UPDATER = "sglang.srt.model_executor.model_runner_components.weight_updater.WeightUpdater"
HOOKED_METHODS = ("init_weights_update_group", "receive_weights_from_distributed", "destroy_weights_update_group")


def register() -> None:
    """SGLang's plugin entry point: wrap the model runner's distributed-update methods (around
    hooks: a call that is not weightsync's goes to SGLang's own method untouched). SGLang loads
    plugins once per process and applies the hooks itself after every plugin ran."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from weightsync_sglang import worker

    for method in HOOKED_METHODS:
        HookRegistry.register(f"{_UPDATER}.{method}", getattr(worker, f"around_{method}"), HookType.AROUND)


__all__ = ["BACKEND_NAME", "HOOKED_METHODS", "register"]
