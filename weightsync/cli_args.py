"""Command-line argument types shared by the `weightsync` commands.

A bad argument must read as one line naming it, exit status 2, never a traceback: each type
here checks its value while argparse parses (raising ArgumentTypeError with the reason), and
`Parser.error` prints that one line. Limits come from the protocol's own (`weightsync.limits`),
so the command line and the HTTP API refuse the same values.

Torch-free: the operator's command parses with these too, and its image has no PyTorch. Types
that need torch or the protocol's models (a device, a manifest file) are the daemon's
(`weightsync_daemon.arg_types`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pydantic

from weightsync.limits import BufferSize, NumBuffers, parse_size

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class Parser(argparse.ArgumentParser):
    """argparse, with defaults shown in --help and errors on one line (no usage block)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (where it has one), and keeps the description's own line
    breaks (examples)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, [], argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


def first_problem(error: pydantic.ValidationError) -> str:
    problem = error.errors()[0]
    where = ".".join(str(p) for p in problem.get("loc", ()))
    return f"{where}: {problem['msg']}" if where else problem["msg"]


def _checked(annotation: Any, value: int, what: str) -> int:
    try:
        return int(pydantic.TypeAdapter(annotation).validate_python(value))
    except pydantic.ValidationError as error:
        raise argparse.ArgumentTypeError(f"{what} {value!r}: {first_problem(error)}") from None


def port(text: str) -> int:
    """A TCP port, 0 for any free one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 0-65535 (0: any free port)")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite, non-negative number of seconds")
    return value


def positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def seconds(text: str) -> float:
    """A duration that may be 0."""
    return _seconds(text)


def byte_size(text: str) -> int:
    """A positive number of bytes ('1048576', '512KiB', '64MiB', '1GiB')."""
    try:
        value = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 1048576, 512KiB, 64MiB, 1GiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 bytes")
    return value


def buffer_size(text: str) -> int:
    """A packed buffer size, within the protocol's limits."""
    return _checked(BufferSize, byte_size(text), "buffer size")


def num_buffers(text: str) -> int:
    return _checked(NumBuffers, positive_int(text), "number of buffers")


def readable_text(text: str, what: str) -> tuple[Path, str]:
    path = Path(text)
    try:
        return path, path.read_text()
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"{what} {text} does not exist") from None
    except IsADirectoryError:
        raise argparse.ArgumentTypeError(f"{what} {text} is a directory") from None
    except (OSError, UnicodeDecodeError) as error:
        raise argparse.ArgumentTypeError(f"{what} {text} cannot be read ({error})") from None


def token_file(text: str) -> Path:
    """A file holding the bearer token: it must exist and hold a non-empty token."""
    path, content = readable_text(text, "token file")
    if not content.strip():
        raise argparse.ArgumentTypeError(f"token file {text} is empty")
    return path


def http_url(text: str) -> str:
    """An http:// URL with a host and port, e.g. http://0.0.0.0:8080/healthz."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a URL ({error})") from None
    if parts.scheme != "http" or not parts.hostname or parts.port is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http://HOST:PORT/PATH URL")
    return text


def log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return text.lower()


def fail(prog: str, message: str) -> NoReturn:
    """Exit 2 with one line, as a bad argument does (for problems found after parsing)."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.exit(2)
