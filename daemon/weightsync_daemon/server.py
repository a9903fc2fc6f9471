"""Serving the app: standalone (its own process) or embedded (a thread of an inference process)."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import uvicorn

from weightsync.protocol import Manifest
from weightsync.store import WeightStore
from weightsync.transports import available
from weightsync_daemon.app import create_app
from weightsync_daemon.auth import TOKEN_ENV, load_token
from weightsync_daemon.service import EngineService, ReceiverService


class EmbeddedServer:
    """Runs uvicorn on a background thread of the current process, e.g. beside a model that
    serves, so received weights land directly in that model's parameters."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
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
                   **kwargs) -> EmbeddedServer:
    return EmbeddedServer(create_app(service, **kwargs), host, port, log_level).start()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="weightsync daemon", description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--backend", default="cpu", choices=available())
    parser.add_argument("--device", default=None, help="torch device for the weights (default: per backend)")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="JSON manifest to shape the weights up front (default: the first update's)")
    parser.add_argument("--token-file", type=Path, default=None,
                        help=f"file holding the bearer token for mutating endpoints (default: ${TOKEN_ENV})")
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run a standalone daemon until SIGTERM; print one JSON line with its URL once it listens."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    service = ReceiverService(backend=args.backend, device=args.device)
    if args.manifest is not None:
        manifest = Manifest.model_validate(json.loads(args.manifest.read_text()))
        service.store = WeightStore.from_manifest(manifest, service.device)
    token = load_token(args.token_file)
    if token is None:
        logging.getLogger("weightsync.daemon").warning(
            "no auth token: anyone who reaches this port can rewrite the weights (set %s)", TOKEN_ENV)
    server = serve_embedded(service, args.host, args.port, args.log_level, token=token)
    print(json.dumps({"url": server.url, "role": service.role}), flush=True)
    wait_for_stop()
    server.stop()


def wait_for_stop() -> None:
    """Block until SIGTERM/SIGINT, or until the parent closes our stdin (when it is a pipe)."""
    stop = threading.Event()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` dumps every thread's stack
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if not sys.stdin.isatty():
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stop.wait()
