"""One demo process: the trainer (rank 0, trains and sends) or an inference worker (serves the
model and receives into its parameters). Each embeds the weightsync HTTP app on a thread and
prints one JSON line with its URL once it is ready. It runs until SIGTERM/SIGINT (or, with
--exit-on-stdin-eof, until its parent closes its stdin)."""

from __future__ import annotations

import hashlib
import json
import threading

import torch
from fastapi import APIRouter

from weightsync import cli_args
from weightsync.store import WeightStore
from weightsync.tokens import load_token
from weightsync_daemon import arg_types
from weightsync_daemon.lifecycle import DEFAULT_GRACE_SECONDS, StopRequest, serve_until_stopped
from weightsync_daemon.server import serve_embedded
from weightsync_daemon.service import ReceiverService, SenderService
from weightsync_operator.demo.model import TinyTransformer, build_model, probe_tokens, train_step


def demo_router(model: TinyTransformer, lock: threading.Lock, trainer: bool) -> APIRouter:
    router = APIRouter(prefix="/demo")

    @router.post("/forward")
    def forward():
        with lock, torch.no_grad():
            logits = model(probe_tokens().to(model.head.weight.device)).cpu().contiguous()
        digest = hashlib.sha256(memoryview(logits.view(torch.uint8).reshape(-1).numpy())).hexdigest()
        return {"output_sha256": digest, "first_logits": logits.view(-1)[:4].tolist()}

    if trainer:
        step = {"n": 0}

        @router.post("/train_step")
        def train():
            with lock:
                step["n"] += 1
                loss = train_step(model, step["n"])
            return {"step": step["n"], "loss": loss}

    return router


def main(argv: list[str] | None = None) -> None:
    parser = cli_args.Parser(prog="python -m weightsync_operator.demo.worker", description=__doc__)
    parser.add_argument("--role", choices=["trainer", "inference"], required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--device", type=arg_types.device, default=None)
    parser.add_argument("--shutdown-grace", type=cli_args.seconds, default=DEFAULT_GRACE_SECONDS)
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help="also stop when stdin ends")
    args = parser.parse_args(argv)
    stop = StopRequest(args.exit_on_stdin_eof)
    torch.set_num_threads(1)  # identical kernels in every process: outputs compare bit for bit
    model = build_model(args.seed)
    if args.device:
        model.to(args.device)
    lock = threading.Lock()
    service: SenderService | ReceiverService
    if args.role == "trainer":
        service = SenderService(source=lambda: list(model.named_parameters()), backend=args.backend,
                                device=args.device)
    else:
        service = ReceiverService(store=WeightStore.from_module(model), backend=args.backend,
                                  device=args.device)
    server = serve_embedded(service, extra_routers=[demo_router(model, lock, args.role == "trainer")],
                            token=load_token())
    print(json.dumps({"url": server.url, "role": args.role}), flush=True)
    serve_until_stopped(server, service, stop, args.shutdown_grace)


if __name__ == "__main__":
    main()
