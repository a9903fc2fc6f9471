"""Serving the app: standalone (its own process) or embedded (a thread of an inference process)."""

from __future__ import annotations

import argparse
import json
import logging
import textwrap
import threading
import time
from urllib.parse import parse_qsl, urlencode

import torch
import uvicorn

from weightsync.dtypes import DTYPES
from weightsync import cli_args
from weightsync.store import WeightStore
from weightsync.tokens import TOKEN_ENV, TokenError, load_token
from weightsync.transports import available
from weightsync_daemon import arg_types
from weightsync_daemon.app import create_app
from weightsync_daemon.guard import (
    DEFAULT_BODY_TIMEOUT_SECONDS, DEFAULT_HEADER_TIMEOUT_SECONDS, DEFAULT_MAX_BODY_BYTES, header_deadline_protocol,
)
from weightsync_daemon.lifecycle import DEFAULT_GRACE_SECONDS, StopRequest, serve_until_stopped
from weightsync_daemon.service import EngineService, ReceiverService


# Query parameters the API takes; any other parameter's value is redacted from the access log (a
# client that puts its token in the URL must not have it written to a log).
LOGGED_QUERY_PARAMETERS = frozenset({"mode", "pause", "resume", "reason", "include_dp"})


class QueryRedaction(logging.Filter):
    """Rewrites uvicorn's access-log line so that only the API's own query parameters keep their
    values: `?token=s3cret` is logged as `?token=REDACTED`."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            path, _, query = args[2].partition("?")
            kept = [(key, value if key in LOGGED_QUERY_PARAMETERS else "REDACTED")
                    for key, value in parse_qsl(query, keep_blank_values=True)]
            record.args = (*args[:2], f"{path}?{urlencode(kept)}", *args[3:])
        return True


class EmbeddedServer:
    """Runs uvicorn on a background thread of the current process, e.g. beside a model that
    serves, so received weights land directly in that model's parameters."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 header_timeout_seconds: float = DEFAULT_HEADER_TIMEOUT_SECONDS):
        # A client gets `header_timeout_seconds` for its request's headers (guard.py); its body's
        # size and pace are the app's (create_app's max_body_bytes, body_timeout_seconds).
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                http=header_deadline_protocol(header_timeout_seconds))
        access = logging.getLogger("uvicorn.access")
        if not any(isinstance(f, QueryRedaction) for f in access.filters):
            access.addFilter(QueryRedaction())
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="weightsync-http", daemon=True)

    def start(self, timeout: float = 30.0) -> "EmbeddedServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the embedded weightsync server did not start")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self._server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """Where a local client reaches it (a wildcard bind is reached on loopback)."""
        host = self._server.config.host
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, host)
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)


def serve_embedded(service: EngineService, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                   header_timeout_seconds: float = DEFAULT_HEADER_TIMEOUT_SECONDS, **kwargs) -> EmbeddedServer:
    """Serve `service` on a thread of this process (e.g. beside the model that serves); warns, as
    the `weightsync daemon` command does, when no token guards it. `kwargs` go to `create_app`
    (token, max_body_bytes, body_timeout_seconds)."""
    warn_without_token(kwargs.get("token"))
    return EmbeddedServer(create_app(service, **kwargs), host, port, log_level,
                          header_timeout_seconds=header_timeout_seconds).start()


def warn_without_token(token: str | None) -> None:
    """The one warning every weightsync server gives when it runs without a bearer token."""
    if token is None:
        logging.getLogger("weightsync.daemon").warning(
            "no auth token: anyone who reaches this port can rewrite the weights (set %s)", TOKEN_ENV)


DAEMON_HELP = """\
A standalone receiver daemon: it holds one GPU's (or the CPU's) copy of the weights and serves the
weight-transfer HTTP API. Once it listens it prints one JSON line, {"url": ..., "role": "receiver"}.
"""

MANIFEST_HELP = """\
--manifest: a JSON file shaping the receiver's weights before the first round, so that the first
update is checked against it (without it, the first update's manifest shapes them). Its format is
the protocol's Manifest: parameters in the order the trainer sends them, each with its name, dtype
and shape, e.g.

  {"tensors": [
    {"name": "embed.weight", "dtype": "bfloat16", "shape": [32000, 4096]},
    {"name": "layers.0.mlp.weight", "dtype": "bfloat16", "shape": [11008, 4096]},
    {"name": "norm.weight", "dtype": "float32", "shape": [4096]}
  ]}

%s

It stops on SIGTERM or SIGINT (what Docker, Kubernetes and systemd send), giving a round in
flight --shutdown-grace seconds to finish; never because its stdin ended, unless
--exit-on-stdin-eof asks for that.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli_args.Parser(prog="weightsync daemon", description=DAEMON_HELP,
                             epilog=MANIFEST_HELP % textwrap.fill(f"dtypes: {', '.join(DTYPES)}.", 98))
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=cli_args.port, default=8200, help="HTTP port (0: any free port)")
    parser.add_argument("--backend", default="cpu", choices=available(), help="transport")
    parser.add_argument("--device", type=arg_types.device, default=None,
                        help="torch device for the weights (none: the backend's, e.g. cuda for nccl)")
    parser.add_argument("--manifest", type=arg_types.manifest_file, default=None, metavar="FILE",
                        help="JSON manifest to shape the weights up front (format below; none: the "
                             "first update's)")
    parser.add_argument("--token-file", type=cli_args.token_file, default=None, metavar="FILE",
                        help=f"file holding the bearer token for mutating endpoints (none: ${TOKEN_ENV})")
    parser.add_argument("--log-level", type=cli_args.log_level, default="warning",
                        help=f"one of {', '.join(cli_args.LOG_LEVELS)}")
    parser.add_argument("--shutdown-grace", type=cli_args.seconds, default=DEFAULT_GRACE_SECONDS,
                        metavar="SECONDS", help="on SIGTERM/SIGINT, how long a round in flight may take to "
                                                "finish before it is abandoned")
    parser.add_argument("--max-body-bytes", type=cli_args.byte_size, default=DEFAULT_MAX_BODY_BYTES,
                        metavar="BYTES", help="larger request bodies get 413 (e.g. 8MiB)")
    parser.add_argument("--body-timeout", type=cli_args.positive_seconds, default=DEFAULT_BODY_TIMEOUT_SECONDS,
                        metavar="SECONDS", help="a request body that takes longer to arrive gets 408")
    parser.add_argument("--header-timeout", type=cli_args.positive_seconds,
                        default=DEFAULT_HEADER_TIMEOUT_SECONDS, metavar="SECONDS",
                        help="a client whose request headers take longer is disconnected")
    parser.add_argument("--cpu-threads", type=cli_args.positive_int, default=1, metavar="N",
                        help="threads for the daemon's own CPU work (unpacking and checksums on the cpu "
                             "backend). PyTorch's default, one per core in every process, oversubscribes a "
                             "host where several daemons, the trainer and the engine share the cores: on 2 "
                             "cores it stalled one round in ten by about 0.3 s")
    parser.add_argument("--exit-on-stdin-eof", action="store_true",
                        help="also stop when stdin reaches its end (for a parent process that wants its "
                             "children gone with it); without it an empty stdin (Docker, Kubernetes, "
                             "nohup) changes nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run a standalone daemon until SIGTERM/SIGINT; print one JSON line with its URL once it listens."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:  # before any thread starts: exiting then is clean
        token = load_token(args.token_file)
    except TokenError as error:
        cli_args.fail("weightsync daemon", str(error))
    stop = StopRequest(args.exit_on_stdin_eof)  # before the server starts: no SIGTERM is lost
    torch.set_num_threads(args.cpu_threads)
    service = ReceiverService(backend=args.backend, device=args.device)
    if args.manifest is not None:
        service.store = WeightStore.from_manifest(args.manifest, service.device)
    try:
        server = serve_embedded(service, args.host, args.port, args.log_level,
                                header_timeout_seconds=args.header_timeout, token=token,
                                max_body_bytes=args.max_body_bytes, body_timeout_seconds=args.body_timeout)
    except RuntimeError as error:  # e.g. the port is taken (uvicorn logged why just before)
        cli_args.fail("weightsync daemon", f"cannot serve on {args.host}:{args.port}: {error}")
    print(json.dumps({"url": server.url, "role": service.role}), flush=True)
    serve_until_stopped(server, service, stop, args.shutdown_grace)
    return 0


def wait_for_stop(exit_on_stdin_eof: bool = False) -> str:
    """Block until SIGTERM/SIGINT (or, only if asked, until stdin reaches its end); returns why."""
    return StopRequest(exit_on_stdin_eof).wait()
