"""What every request passes before the app sees it: the bearer token, then the body's size and
pace. An ASGI middleware rather than a dependency, because FastAPI reads and parses a body before
it runs any dependency: a stranger's 300 MB body would be parsed before its 401.

- POST (and every other non-read method) needs the token when one is set: 401 before a single
  body byte is read, whatever the body.
- A body over `max_body_bytes` is refused with 413: at once when Content-Length says so (a client
  that sends all of it before reading may see the connection reset instead), else once the bytes
  read pass the limit (chunked uploads; the rest is read and dropped, within the body's deadline).
- A body must arrive within `body_timeout_seconds` of the request's headers: a client that
  trickles it gets 408 instead of holding the request (and its memory) open. (Headers that trickle
  are the server's job: see `server.EmbeddedServer`.)
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from weightsync_daemon.auth import BearerAuth

if TYPE_CHECKING:
    class _UvicornProtocol(asyncio.Protocol):
        """What the mixin below uses of uvicorn's HTTP protocols (h11's and httptools')."""

        transport: asyncio.Transport
        loop: asyncio.AbstractEventLoop

        def on_response_complete(self) -> None: ...
else:
    _UvicornProtocol = object

DEFAULT_MAX_BODY_BYTES = 8 << 20  # 8 MiB: a manifest of ~80,000 parameters, or an ipc handle list
DEFAULT_BODY_TIMEOUT_SECONDS = 30.0
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def error_body(detail: str, field: str | None = None) -> dict:
    """The one error shape every 4xx/5xx answer has (models.ErrorBody)."""
    return {"detail": detail, "field": field}


async def send_error(send: Send, status: int, detail: str, field: str | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(error_body(detail, field)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    def __init__(self, app: ASGIApp, auth: BearerAuth, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 body_timeout_seconds: float = DEFAULT_BODY_TIMEOUT_SECONDS):
        if max_body_bytes < 1 or body_timeout_seconds <= 0:
            raise ValueError("max_body_bytes and body_timeout_seconds must be positive")
        self.app, self.auth = app, auth
        self.max_body_bytes, self.body_timeout_seconds = max_body_bytes, body_timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        if scope["method"] not in READ_METHODS and not self.auth.allows(
                headers.get(b"authorization", b"").decode("latin-1")):
            await send_error(send, 401, "a valid bearer token is required",
                             headers=[(b"www-authenticate", b"Bearer")])
            return
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or len(declared) > 18:
                await send_error(send, 400, "Content-Length is not a byte count", "body")
                return
            if int(declared) > self.max_body_bytes:
                await send_error(send, 413, self._too_large(), "body")
                return
        await self.app(scope, self._bounded(receive), send)

    def _too_large(self) -> str:
        return f"the body is larger than this daemon's limit of {self.max_body_bytes} bytes (max_body_bytes)"

    def _bounded(self, receive: Receive) -> Receive:
        """`receive`, counting body bytes against the limit and the body's deadline; raises
        HTTPException (413, 408), which FastAPI passes on to the app's error handler."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_seconds
        state = {"bytes": 0, "more": True}

        async def receive_bounded() -> Message:
            if not state["more"]:  # the body is in: later receives only report a disconnect
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, f"the body did not arrive within {self.body_timeout_seconds:g}s "
                                         "(body_timeout_seconds)") from None
            if message["type"] == "http.request":
                state["bytes"] += len(message.get("body", b""))
                state["more"] = message.get("more_body", False)
                if state["bytes"] > self.max_body_bytes:
                    await drain()
                    raise HTTPException(413, self._too_large())
            else:
                state["more"] = False
            return message

        async def drain() -> None:
            # Read the rest of an oversized body, keeping none of it (until its deadline): closing
            # with bytes unread would reset the connection, and a client still sending would
            # never see its 413.
            try:
                async with asyncio.timeout_at(deadline):
                    while state["more"]:
                        message = await receive()
                        state["more"] = message["type"] == "http.request" and message.get("more_body", False)
            except TimeoutError:
                pass

        return receive_bounded


DEFAULT_HEADER_TIMEOUT_SECONDS = 10.0


def header_deadline_protocol(seconds: float = DEFAULT_HEADER_TIMEOUT_SECONDS) -> type:
    """uvicorn's HTTP protocol, closing a connection whose request headers are not complete
    `seconds` after it opened (or after its previous response): uvicorn itself waits for them
    forever, so a client sending a byte a second would hold a connection open indefinitely.

    httptools' C parser where it is installed (the daemon extra installs it), else h11: every
    control call of a round costs each daemon its HTTP parsing, and with tens of daemons sharing a
    node's cores that CPU is the round's control time (httptools: about a quarter less CPU per
    call, benchmarks/operator_overhead.py --targets)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is not installed
        return _h11_deadline_protocol(seconds)

    class HttpToolsDeadlineProtocol(_HeaderDeadline, HttpToolsProtocol):
        header_seconds = seconds

        def on_headers_complete(self) -> None:
            self._disarm_headers()
            super().on_headers_complete()

        def _awaiting_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete  # no request in flight

    return HttpToolsDeadlineProtocol


class _HeaderDeadline(_UvicornProtocol):
    """The headers' timer, for either protocol (it comes before the protocol in the bases):
    armed when a connection opens and after each response, disarmed once a request's headers are
    in (each protocol's own hook); when it fires while the protocol still awaits headers
    (`_awaiting_headers`), the connection is closed."""

    header_seconds: float
    _headers_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn's signature
        super().connection_made(transport)
        self._arm_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_headers()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_headers()  # the next request's headers get the same time

    def _arm_headers(self) -> None:
        self._disarm_headers()
        self._headers_timer = self.loop.call_later(self.header_seconds, self._headers_late)

    def _disarm_headers(self) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None

    def _headers_late(self) -> None:
        self._headers_timer = None
        if self._awaiting_headers() and not self.transport.is_closing():
            self.transport.close()

    def _awaiting_headers(self) -> bool:
        raise NotImplementedError


def _h11_deadline_protocol(seconds: float) -> type:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(_HeaderDeadline, H11Protocol):
        header_seconds = seconds

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # the request's headers are in
                self._disarm_headers()

        def _awaiting_headers(self) -> bool:
            return self.conn.their_state is h11.IDLE

    return HeaderDeadlineProtocol
