"""Dispatch `weightsync COMMAND ...` to the command's own `main(argv)`; see the package docstring."""

from __future__ import annotations

import importlib
import sys

from weightsync import cli_args

# Each command: the module whose `main(argv) -> int` runs it, its one-line help, and the extra
# that installs what it imports.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("weightsync_operator.demo.cli",
             "run a trainer and N daemons (or a real vLLM server) locally and verify every round", "demo"),
    "daemon": ("weightsync_daemon.server", "run a standalone receiver daemon", "daemon"),
    "operator": ("weightsync_operator.operator_cli", "run the Kubernetes operator", "operator"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        module, _, extra = COMMANDS[argv[0]]
        try:
            command = importlib.import_module(module)
        except ModuleNotFoundError as error:  # an install without this command's extra
            if (error.name or "weightsync").startswith("weightsync"):
                raise  # ours: a bug, not a missing install
            cli_args.fail(f"weightsync {argv[0]}", f"needs {error.name}, which is not installed: "
                                                    f"pip install 'weightsync[{extra}]'")
        return command.main(argv[1:])
    parser = cli_args.Parser(prog="weightsync", description="Move model weights from an RL trainer to "
                             "inference workers, fast and safely.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary, _) in COMMANDS.items():
        commands.add_parser(name, help=f"{summary} (see `weightsync {name} --help`)", add_help=False)
    parser.parse_args(argv)  # --help, or the error naming what is missing or unknown
    return 2


if __name__ == "__main__":  # `python -m weightsync_cli.main ...` runs the command too
    sys.exit(main())
