"""The vLLM demo's trainer process: the tiny Qwen2 model in Hugging Face transformers, served
as rank 0 of the transfer group under its HF parameter names (vLLM's `load_weights` fuses
q/k/v and gate/up itself), with two demo routes: a real training step, and HF's greedy
generation on the current weights — the reference vLLM's completions must equal after a round.
With --build it first creates the model (seeded, random) and saves it in --model, the
checkpoint the vLLM server then starts from: this process runs in the Python that has
transformers (the vLLM venv), the demo or test that starts it need not. Prints one JSON line
with its URL once it listens, like the other demo workers."""

from __future__ import annotations

import json
import threading

import torch
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from weightsync import cli_args
from weightsync.tokens import load_token
from weightsync_daemon.lifecycle import DEFAULT_GRACE_SECONDS, StopRequest, serve_until_stopped
from weightsync_daemon.server import serve_embedded
from weightsync_daemon.service import SenderService
from weightsync_operator.demo import qwen2


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[list[int]] = Field(min_length=1)
    max_tokens: int = Field(ge=1, le=128)


def trainer_router(model, lock: threading.Lock) -> APIRouter:
    router = APIRouter(prefix="/demo")
    step = {"n": 0}

    @router.post("/train_step")
    def train():
        with lock:
            step["n"] += 1
            loss = qwen2.train_step(model)
        return {"step": step["n"], "loss": loss}

    @router.post("/generate")
    def generate(body: GenerateRequest):
        with lock:
            return {"completions": [qwen2.greedy(model, p, body.max_tokens) for p in body.prompts]}

    return router


def main(argv: list[str] | None = None) -> None:
    parser = cli_args.Parser(prog="python -m weightsync_operator.demo.qwen2_trainer", description=__doc__)
    parser.add_argument("--model", required=True, help="directory of the saved HF model")
    parser.add_argument("--build", action="store_true", help="first build the model and save it there")
    parser.add_argument("--seed", type=int, default=0, help="the built model's random seed")
    parser.add_argument("--tie-word-embeddings", action="store_true", help="the built model's lm_head is its embedding")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--shutdown-grace", type=cli_args.seconds, default=DEFAULT_GRACE_SECONDS)
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help="also stop when stdin ends")
    args = parser.parse_args(argv)
    stop = StopRequest(args.exit_on_stdin_eof)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the demo's output is its own lines
    if args.build:
        qwen2.build(args.model, args.seed, args.tie_word_embeddings)
    model = qwen2.load(args.model)
    lock = threading.Lock()
    # Parameters only: a tied lm_head is the embedding itself, listed once (vLLM ties it too).
    service = SenderService(source=lambda: [(n, p.detach()) for n, p in model.named_parameters()],
                            backend=args.backend)
    server = serve_embedded(service, extra_routers=[trainer_router(model, lock)], token=load_token())
    print(json.dumps({"url": server.url, "role": "trainer"}), flush=True)
    serve_until_stopped(server, service, stop, args.shutdown_grace)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
