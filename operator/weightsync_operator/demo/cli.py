"""`weightsync demo`: local mode, the coordinator over processes on this machine.

By default a trainer and N weightsync daemons; with `--engine vllm`, a trainer and one real vLLM
server with the weightsync backend; with `--engine sglang`, one real SGLang server with the
weightsync plugin. Every round is verified: the daemons' weights bit for bit,
vLLM's greedy completions token for token against the trainer's model.
"""

from __future__ import annotations

from weightsync import cli_args


def main(argv: list[str]) -> int:
    parser = cli_args.Parser(prog="weightsync demo", description=__doc__)
    parser.add_argument("--daemons", type=cli_args.positive_int, default=2, help="inference daemons")
    parser.add_argument("--rounds", type=cli_args.positive_int, default=5, help="sync rounds")
    parser.add_argument("--backend", default="auto", choices=["auto", "cpu", "ipc", "p2p", "nccl"],
                        help="transport (auto: p2p or nccl with 2+ GPUs, ipc with one, cpu otherwise)")
    parser.add_argument("--buffer-size", type=cli_args.buffer_size, default="1MiB",
                        help="packed buffer size, e.g. 1048576, 512KiB, 64MiB (small, so that the small "
                             "model spans several buffers)")
    parser.add_argument("--buffers", type=cli_args.num_buffers, default=2, help="packed buffers in flight")
    parser.add_argument("--engine", default="daemon", choices=["daemon", "vllm", "sglang"],
                        help="the targets: weightsync daemons (default), or one real vLLM server with the "
                             "weightsync backend, checked by its greedy completions (needs vLLM here or "
                             "$WEIGHTSYNC_VLLM_PYTHON; cpu transport), or one real SGLang server with the "
                             "weightsync plugin, checked the same way (needs SGLang here or "
                             "$WEIGHTSYNC_SGLANG_PYTHON)")
    parser.add_argument("--tensor-parallel", type=cli_args.positive_int, default=1,
                        help="the vLLM server's tensor-parallel size (--engine vllm)")
    args = parser.parse_args(argv)
    if args.engine == "sglang":
        if args.backend not in ("auto", "cpu"):
            parser.error(f"--backend {args.backend}: the SGLang demo runs on the cpu transport")
        from weightsync_operator.demo.sglang_run import main as sglang_demo_main

        return sglang_demo_main(args.rounds)
    if args.engine == "vllm":
        if args.backend not in ("auto", "cpu"):
            parser.error(f"--backend {args.backend}: the vLLM demo runs on the cpu transport")
        from weightsync_operator.demo.vllm_run import main as vllm_demo_main

        return vllm_demo_main(args.rounds, args.tensor_parallel)
    from weightsync_operator.demo.run import main as demo_main

    return demo_main(args.daemons, args.rounds, args.backend, args.buffer_size, args.buffers)
