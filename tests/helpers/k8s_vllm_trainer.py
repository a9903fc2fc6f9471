"""A real trainer for the operator's vLLM tests: the tiny Qwen2 model in Hugging Face
transformers, led through `weightsync_operator.trainer_client.connect` (the trainer pod's agent, rank 0) and published
with `push` (bumps the WeightSync's spec.version and waits for the operator's round), plus HF's
greedy generation on its current weights: what every vLLM pod must answer after a round.

    $WEIGHTSYNC_VLLM_PYTHON -m k8s_vllm_trainer --name S --namespace NS --pod P --kubeconfig F --model DIR

Runs with the vLLM venv's Python (it has transformers and the same torch as the servers). That
venv has no Kubernetes client: the test passes the main venv's site-packages in
$WEIGHTSYNC_KUBE_SITE, appended to sys.path *after* this venv's own, so only what is missing here
(the `kubernetes` client and its few pure-Python dependencies) comes from there.

It builds the model into --model first (the checkpoint the vLLM servers start from), prints one
JSON line {"url": ...} once its agent listens, then answers one JSON line per stdin command:
  {"cmd": "wait_ready"}                      → {"ok": true, "rendezvous": {...}}
  {"cmd": "push", "version": 2}              → one training step, then push: {"ok": true, "result": {...}}
                                               or {"ok": false, "error": "PushFailed", "reason": "..."}
  {"cmd": "generate", "prompts": [[...]], "max_tokens": 12} → {"ok": true, "completions": [[...]]}
Closing stdin stops it.
"""

from __future__ import annotations

import argparse
import os
import sys

KUBE_SITE_ENV = "WEIGHTSYNC_KUBE_SITE"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--pod", required=True)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--model", required=True, help="directory to build the model in")
    parser.add_argument("--push-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    if os.environ.get(KUBE_SITE_ENV):
        sys.path.append(os.environ[KUBE_SITE_ENV])

    import torch
    from transformers.utils import logging as hf_logging

    from weightsync_operator.demo import qwen2
    from weightsync_operator.kube import KubeApi
    from weightsync_operator.trainer_client import connect

    from k8s_trainer import serve_commands  # the same stdin protocol

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    qwen2.build(args.model)
    model = qwen2.load(args.model)
    client = connect(args.name, args.namespace, port=0, host="127.0.0.1", pod_name=args.pod,
                     kube=KubeApi.from_environment(args.kubeconfig), wait=False)

    def push(command: dict):
        qwen2.train_step(model)
        return client.push(model.named_parameters(), command["version"], timeout=args.push_timeout), {}

    def generate(command: dict) -> dict:
        return {"completions": [qwen2.greedy(model, p, command["max_tokens"]) for p in command["prompts"]]}

    serve_commands(client, push, generate=generate)


if __name__ == "__main__":
    main()
