"""The `weightsync` command: `demo` (local mode), `daemon` (a standalone receiver), `operator`
(the Kubernetes operator)."""

from __future__ import annotations

import sys

from weightsync_daemon import cli_args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = cli_args.Parser(prog="weightsync", description="Move model weights from an RL "
                             "trainer to inference workers, fast and safely.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run a trainer and N daemons locally and verify every round")
    demo.add_argument("--daemons", type=cli_args.positive_int, default=2, help="inference daemons")
    demo.add_argument("--rounds", type=cli_args.positive_int, default=5, help="sync rounds")
    demo.add_argument("--backend", default="auto", choices=["auto", "cpu", "ipc", "p2p", "nccl"],
                      help="transport (auto: p2p or nccl with 2+ GPUs, ipc with one, cpu otherwise)")
    demo.add_argument("--buffer-size", type=cli_args.buffer_size, default="1MiB",
                      help="packed buffer size, e.g. 1048576, 512KiB, 64MiB (small, so that the small "
                           "model spans several buffers)")
    demo.add_argument("--buffers", type=cli_args.num_buffers, default=2, help="packed buffers in flight")
    demo.add_argument("--engine", default="daemon", choices=["daemon", "vllm"],
                      help="the targets: weightsync daemons (default), or one real vLLM server with the "
                           "weightsync backend, checked by its greedy completions (needs vLLM here or "
                           "$WEIGHTSYNC_VLLM_PYTHON; cpu transport)")
    demo.add_argument("--tensor-parallel", type=cli_args.positive_int, default=1,
                      help="the vLLM server's tensor-parallel size (--engine vllm)")

    commands.add_parser("daemon", help="run a standalone receiver daemon (see `weightsync daemon --help`)",
                        add_help=False)
    commands.add_parser("operator", help="run the Kubernetes operator (see `weightsync operator --help`)",
                        add_help=False)

    if argv and argv[0] == "daemon":
        from weightsync_daemon.server import main as daemon_main

        return daemon_main(argv[1:])
    if argv and argv[0] == "operator":
        from weightsync_operator.operator_cli import main as operator_main

        return operator_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "demo" and args.engine == "vllm":
        if args.backend not in ("auto", "cpu"):
            demo.error(f"--backend {args.backend}: the vLLM demo runs on the cpu transport")
        from weightsync_operator.demo.vllm_run import main as vllm_demo_main

        return vllm_demo_main(args.rounds, args.tensor_parallel)
    if args.command == "demo":
        from weightsync_operator.demo.run import main as demo_main

        return demo_main(args.daemons, args.rounds, args.backend, args.buffer_size, args.buffers)
    return 2


if __name__ == "__main__":
    sys.exit(main())
