"""How a long-running weightsync process stops.

Docker without `-i`, Kubernetes, systemd and `nohup` all start a process with an empty stdin and
no terminal, and stop it with SIGTERM. So a daemon (or a trainer's agent) runs until SIGTERM or
SIGINT, never until its stdin ends; a parent that wants "exit when I close your stdin" (a test
harness that must not leave orphans behind if it dies) asks for it with `exit_on_stdin_eof`.

Stopping gives a round in flight a bounded grace period to finish (so the other parties' round
succeeds instead of failing on a vanished peer), then stops the HTTP server; a process still
held after that (a collective that waits on a peer) is ended, so a stop never takes longer than
its bound.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from typing import Protocol

from weightsync_daemon.service import EngineService, Phase

log = logging.getLogger("weightsync.daemon")

DEFAULT_GRACE_SECONDS = 20.0  # below Kubernetes' default terminationGracePeriodSeconds (30 s)
SERVER_STOP_SECONDS = 5.0  # for the HTTP server to close once no round is in flight
POLL_SECONDS = 0.05


class StopRequest:
    """SIGTERM/SIGINT (and, only if asked, EOF on stdin) as an event the main thread waits on.

    A second signal while stopping means "hurry": the grace period for a round in flight ends."""

    def __init__(self, exit_on_stdin_eof: bool = False):
        self.requested = threading.Event()
        self.hurry = threading.Event()
        self.reason = ""
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` dumps every thread's stack
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if exit_on_stdin_eof:
            threading.Thread(target=self._watch_stdin, name="weightsync-stdin", daemon=True).start()

    def _on_signal(self, signum: int, _frame) -> None:
        self._request(signal.Signals(signum).name)

    def _watch_stdin(self) -> None:
        try:
            while sys.stdin.buffer.read(1 << 16):
                pass
        except (OSError, ValueError):  # stdin closed or unreadable: the parent is gone as well
            pass
        self._request("stdin closed")

    def _request(self, reason: str) -> None:
        if self.requested.is_set():
            self.hurry.set()
            return
        self.reason = reason
        self.requested.set()

    def wait(self) -> str:
        """Block until a stop is requested; returns why (e.g. "SIGTERM")."""
        self.requested.wait()
        return self.reason


class Server(Protocol):
    def stop(self, timeout: float = ...) -> None: ...


STARTED_ROUND_WAIT_SECONDS = 5.0  # how long a started round with nothing landed yet is waited for


def round_in_flight(service: EngineService) -> bool:
    """Whether stopping now would fail a round the other parties are in: an update is landing or
    has landed (finish is due), or a round started moments ago (its update is on its way). A round
    started long ago with nothing landed is not waited for: no coordinator is driving it."""
    round_ = service.round
    if service.phase != Phase.UPDATING or round_ is None:
        return False
    if round_.stats or service.call_in_progress:
        return True
    return time.monotonic() - round_.last_activity < STARTED_ROUND_WAIT_SECONDS


def wait_for_round(service: EngineService, grace: float, hurry: threading.Event) -> bool:
    """Wait up to `grace` seconds (less once `hurry` is set) for the round in flight to end;
    True once none is in flight."""
    deadline = time.monotonic() + grace
    while round_in_flight(service):
        left = deadline - time.monotonic()
        if left <= 0 or hurry.is_set():
            return False
        hurry.wait(min(POLL_SECONDS, left))
    return True


def stop_gracefully(server: Server, service: EngineService, stop: StopRequest, grace: float) -> None:
    """Let a round in flight finish (bounded by `grace`), stop the HTTP server, and make sure
    the process ends within the bound even if a transfer still holds a thread."""
    if round_in_flight(service):
        log.warning("%s: waiting up to %gs for the round in flight to finish", stop.reason, grace)
    finished = wait_for_round(service, grace, stop.hurry)
    if not finished:
        log.warning("the round in flight did not finish within %gs: abandoning it (the other parties "
                    "fail it, as for any lost peer)", grace)
    else:
        log.info("%s: stopping", stop.reason)
    _exit_after(SERVER_STOP_SECONDS * 2)
    server.stop(SERVER_STOP_SECONDS)
    if not finished:
        _exit_now()


def _exit_now() -> None:
    """End the process now, status 0 (a requested stop): a thread held in a collective would
    otherwise keep the interpreter from exiting until that collective times out."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def _exit_after(seconds: float) -> None:
    """A deadline for the rest of the stop (server shutdown, interpreter exit)."""
    timer = threading.Timer(seconds, _exit_now)
    timer.daemon = True
    timer.start()


def serve_until_stopped(server: Server, service: EngineService, stop: StopRequest,
                        grace: float = DEFAULT_GRACE_SECONDS) -> str:
    """Run until `stop` is requested, then stop gracefully; returns why it stopped. Create the
    StopRequest before starting the server, so that a SIGTERM during startup is not lost."""
    reason = stop.wait()
    stop_gracefully(server, service, stop, grace)
    return reason
