"""The `weightsync` command: `demo` (local mode), `daemon` (a standalone receiver), `operator`
(the Kubernetes operator)."""

from __future__ import annotations

import argparse
import sys

from weightsync.layout import parse_size


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="weightsync", description="Move model weights from an RL "
                                     "trainer to inference workers, fast and safely.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run a trainer and N daemons locally and verify every round")
    demo.add_argument("--daemons", type=int, default=2)
    demo.add_argument("--rounds", type=int, default=5)
    demo.add_argument("--backend", default="auto", choices=["auto", "cpu", "ipc", "p2p", "nccl"],
                      help="transport (default auto: p2p or nccl with 2+ GPUs, ipc with one, cpu otherwise)")
    demo.add_argument("--buffer-size", type=parse_size, default=parse_size("1MiB"),
                      help="packed buffer size (default 1MiB, so the small model spans several buffers)")
    demo.add_argument("--buffers", type=int, default=2, help="packed buffers in flight")

    commands.add_parser("daemon", help="run a standalone receiver daemon (see `weightsync daemon --help`)",
                        add_help=False)
    commands.add_parser("operator", help="run the Kubernetes operator (see `weightsync operator --help`)",
                        add_help=False)

    if argv and argv[0] == "daemon":
        from weightsync_daemon.server import main as daemon_main

        daemon_main(argv[1:])
        return 0
    if argv and argv[0] == "operator":
        from weightsync_operator.operator_cli import main as operator_main

        return operator_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "demo":
        from weightsync_operator.demo.run import main as demo_main

        return demo_main(args.daemons, args.rounds, args.backend, args.buffer_size, args.buffers)
    return 2


if __name__ == "__main__":
    sys.exit(main())
