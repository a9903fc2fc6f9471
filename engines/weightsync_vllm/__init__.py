"""weightsync as a vLLM weight-transfer backend.

vLLM finds this package through the `vllm.general_plugins` entry point and calls `register()`
in each of its processes (API server, engine core, workers). `register()` names the worker
engine in vLLM's `WeightTransferEngineFactory` under "weightsync"; vLLM imports the engine
module (which imports vLLM) only in its workers, when the server was started with
`--weight-transfer-config '{"backend": "weightsync"}'`.

Dependency direction: this package uses `weightsync` (core and transports); nothing in
`weightsync/` imports it. Importing this package does not import vLLM, so a trainer process
can use `weightsync_vllm.trainer` without vLLM installed.
"""

from __future__ import annotations

ENGINE_NAME = "weightsync"
ENGINE_MODULE = "weightsync_vllm.engine"
ENGINE_CLASS = "WeightsyncWorkerEngine"
TRAINER_MODULE = "weightsync_vllm.trainer_engine"
TRAINER_CLASS = "WeightsyncTrainerEngine"


def register() -> None:
    """Register the worker engine with vLLM; safe to call any number of times.

    vLLM may run plugins more than once per process tree (a forked worker inherits the
    registry of its parent), and its factory raises on a duplicate name, so a registration
    that is already there is left alone.
    """
    from vllm.distributed.weight_transfer.factory import (
        WeightTransferEngineFactory, WeightTransferTrainerFactory,
    )

    # The trainer engine (weightsync_vllm.trainer_engine) under the same name in vLLM's
    # trainer-side registry, for trainer code written against vLLM's trainer API.
    for factory, module, cls in ((WeightTransferEngineFactory, ENGINE_MODULE, ENGINE_CLASS),
                                 (WeightTransferTrainerFactory, TRAINER_MODULE, TRAINER_CLASS)):
        try:
            factory.register_engine(ENGINE_NAME, module, cls)
        except ValueError as error:
            if "already registered" not in str(error):
                raise


__all__ = ["ENGINE_CLASS", "ENGINE_MODULE", "ENGINE_NAME", "register"]
