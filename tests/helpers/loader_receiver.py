"""A receiver process for the GPU loader-sink tests: joins a group on one GPU and takes each round
into a vLLM-shaped model (fused qkv and gate_up parameters) through a LoaderSink.

Protocol: prints {"ready": true} once joined; then per stdin line (JSON: the UpdateInfo body, {} for
nccl) one round, answered with one JSON line: the digest of every loaded slice in manifest order,
how many tensors were loaded, and the error (with weights_touched) if the round failed."""

import argparse
import json
import pathlib
import sys
import traceback

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # run as a script: the repository's benchmarks
from benchmarks.vllm_shaped import FusedModel  # noqa: E402

from weightsync import InitInfo, UpdateInfo  # noqa: E402
from weightsync.landing import LoaderSink  # noqa: E402
from weightsync.transports import get_transport  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--init", required=True, help="init_info as JSON")
    parser.add_argument("--shapes", required=True, help="[[name, shape], ...] as JSON (bfloat16)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.cuda.set_device(device)
    shapes = [(name, tuple(shape)) for name, shape in json.loads(args.shapes)]
    model = FusedModel(shapes, torch.bfloat16, device)
    sink = LoaderSink(model.load_weights, model.check)
    transport = get_transport(args.backend).connect(InitInfo(**json.loads(args.init)), 1, device)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        body = json.loads(line)
        names = [name for name, _ in shapes]
        try:
            stats = transport.receive(sink, UpdateInfo(**body))
            torch.cuda.synchronize(device)
            answer = {"ok": True, "checksum": stats.checksum, "digest": model.digest(names)}
        except Exception as error:  # noqa: BLE001 - reported to the test
            answer = {"ok": False, "error": f"{type(error).__name__}: {error}",
                      "touched": getattr(error, "weights_touched", None), "trace": traceback.format_exc()[-2000:]}
        answer.update(loaded=sink.loaded_tensors, staging=sink.staging_bytes)
        print(json.dumps(answer), flush=True)
    transport.close()


if __name__ == "__main__":
    main()
