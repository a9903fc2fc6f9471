"""Dispatch `weightsync COMMAND ...` to the command's own `main(argv)`; see the package docstring."""

from __future__ import annotations

import importlib
import sys

from weightsync import cli_args

# Each command: the module whose `main(argv) -> int` runs it, and its one-line help.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("weightsync_operator.demo.cli",
             "run a trainer and N daemons (or a real vLLM server) locally and verify every round"),
    "daemon": ("weightsync_daemon.server", "run a standalone receiver daemon"),
    "operator": ("weightsync_operator.operator_cli", "run the Kubernetes operator"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        module, _ = COMMANDS[argv[0]]
        return importlib.import_module(module).main(argv[1:])
    parser = cli_args.Parser(prog="weightsync", description="Move model weights from an RL trainer to "
                             "inference workers, fast and safely.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=f"{summary} (see `weightsync {name} --help`)", add_help=False)
    parser.parse_args(argv)  # --help, or the error naming what is missing or unknown
    return 2
