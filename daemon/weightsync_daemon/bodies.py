"""Request bodies, parsed and validated without stalling the event loop.

Why not FastAPI's own body handling: it parses JSON and validates the result on the event loop, in
pydantic's lax mode. Both are wrong here. Lax mode reads `"2"` as a world size and `true` as port 1
(the caller's error then surfaces seconds later as a 503). And a C parser holds the interpreter
lock for its whole run: a 6 MB manifest (about 100,000 parameters, what a 100 B mixture-of-experts
model has) takes 0.2-0.3 s of parse and validation in which /healthz cannot answer, and a thread
does not help, because the lock is not released while the parser runs.

So every body is validated strictly from its bytes (`Model.model_validate_json`: JSON types as
JSON says them), and a body over `SMALL_BODY_BYTES` is validated in a child process of this one
(`BodyParser`), which imports no PyTorch (the wire models are torch-free). The child hands the
validated values back as JSON cut into small frames (`encode_frames`): every long list or dict
travels in slices of `SLICE_ITEMS` items, each decoded by one short call on the parser's thread,
so the interpreter lock changes hands between slices (a few milliseconds each) and the event loop
keeps answering. The model is then assembled from the already validated values without validating
them again (`assemble`). Nothing is pickled. If the child cannot run, the body is validated on
the parser's thread instead, and a warning says why.

Run as `python -m weightsync_daemon.bodies`, this module is that child: it reads framed requests
(model name, body) on stdin and answers each with its frames on stdout until stdin closes.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import secrets
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, TypeVar, cast

from pydantic import BaseModel, ValidationError

from weightsync.errors import ProtocolError
from weightsync.protocol import InitInfo, UpdateInfo
from weightsync_daemon.models import FinishRequest, InitRequest, StartRequest, UpdateRequest, WeightCheckRequest

log = logging.getLogger("weightsync.daemon")

SMALL_BODY_BYTES = 256 << 10  # validated in place: a few milliseconds at most
PARSE_TIMEOUT_SECONDS = 30.0  # a child that takes longer is replaced
RELEASE_DELAY_SECONDS = 2.0  # after the last large body: return the allocator's free pages
MODELS: dict[str, type[BaseModel]] = {model.__name__: model for model in (
    InitRequest, StartRequest, UpdateRequest, FinishRequest, WeightCheckRequest)}
# Pydantic's labels for the union member it tried: noise in a field's path.
_UNION_LABELS = frozenset({"str", "int", "bool", "float", "none", "dict[str,any]"})
SLICE_ITEMS = 4096  # a frame holds at most this many items of a long list or dict: ~5 ms to decode
_HEADER = struct.Struct("!II")  # request: model name length, body length
_LENGTH = struct.Struct("!I")  # answer: one frame's length

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Invalid:
    """Why a body was refused: the dotted path of the field at fault (`body` for the body as a
    whole), and the message that names it."""

    field: str
    message: str

    def error(self) -> ProtocolError:
        return ProtocolError(self.field, self.message)


def first_problem(error: ValidationError) -> Invalid:
    """The first thing pydantic found wrong, as the field at fault and a message naming it."""
    problem = error.errors(include_url=False)[0]
    if problem.get("type") == "json_invalid":
        reason = str(problem.get("ctx", {}).get("error", "decode error"))
        return Invalid("body", f"not valid JSON ({reason})")
    loc = [str(p) for p in problem.get("loc", ())]
    loc = [p for p in loc if p not in _UNION_LABELS and not p.startswith(
        ("list[", "UpdateInfo", "function-", "constrained-", "json-or-python"))]
    return Invalid(".".join(loc) or "body", problem.get("msg", "invalid"))


def validate(model_name: str, raw: bytes) -> BaseModel | Invalid:
    """`raw` validated strictly as the model named `model_name` (one of MODELS)."""
    model = MODELS[model_name]
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        problem = first_problem(error)
    if problem.field == "body" and "number out of range" in problem.message:
        # A number too long for any field: find the field that holds it, to name it.
        try:
            model.model_validate(json.loads(raw, parse_int=_digits_as_text))
        except (ValidationError, ValueError) as error:
            return first_problem(error) if isinstance(error, ValidationError) else problem
    return problem


def _digits_as_text(digits: str) -> int | str:
    # Python's int() refuses more than 4,300 digits; such a number is no valid value of any
    # field, so it stays text, and the field's own type refuses it by name.
    return int(digits) if len(digits) <= 64 else digits


class BodyParser:
    """Validates bodies: small ones in place, large ones in a child process (see the module
    docstring), one at a time, on a thread of its own that waits for the child.

    Memory: a large body's bytes and its model are freed once its request ends, but the C
    allocator keeps freed pages mapped for reuse: after two bursts of ten 6 MB bodies a daemon's
    RSS stayed 72 MiB above its start (241 -> 313 MiB) although nothing held them; handing the
    free pages back (`malloc_trim`) brought it to 47 MiB above (288 MiB), the rest being
    Python's own partly used pools (tests/daemon/test_daemon_holes.py prints the figures). So
    `RELEASE_DELAY_SECONDS` after the last large body, the free pages go back to the system."""

    def __init__(self, small_body_bytes: int = SMALL_BODY_BYTES):
        self.small_body_bytes = small_body_bytes
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="weightsync-bodies")
        self._child: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._release: asyncio.TimerHandle | None = None

    async def parse(self, model: type[M], raw: bytes) -> M:
        """`raw` validated as `model`; ProtocolError naming the field (HTTP 422) if it is not."""
        if model.__name__ not in MODELS:
            raise TypeError(f"{model.__name__} is not a request body model")
        if len(raw) <= self.small_body_bytes:
            result = validate(model.__name__, raw)
        else:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._thread, self._in_child, model.__name__, raw)
            if self._release is not None:
                self._release.cancel()
            self._release = loop.call_later(RELEASE_DELAY_SECONDS, release_free_memory)
        if isinstance(result, Invalid):
            raise result.error()
        return cast(M, result)  # validated or assembled as MODELS[model.__name__], that is `model`

    def _in_child(self, model_name: str, raw: bytes) -> BaseModel | Invalid:
        with self._lock:
            try:
                child = self._started()
                _write_request(_pipe(child.stdin), model_name.encode(), raw)
                return _read_answer(child, model_name, PARSE_TIMEOUT_SECONDS)
            except (OSError, EOFError, ValueError) as error:
                log.warning("the body parser process failed (%s); validating this body on a thread", error)
                self._stop_child()
                return validate(model_name, raw)

    def _started(self) -> subprocess.Popen[bytes]:
        if self._child is None or self._child.poll() is not None:
            # The marker key of a sliced list is secret to this pair: no body can forge one.
            self._marker = secrets.token_hex(16)
            self._child = subprocess.Popen([sys.executable, "-m", "weightsync_daemon.bodies", self._marker],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return self._child

    def _stop_child(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        try:
            _pipe(child.stdin).close()
            child.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            child.kill()
            child.wait()

    def close(self) -> None:
        """Stop the child (it also stops on its own when this process ends: its stdin closes)."""
        with self._lock:
            self._stop_child()
        self._thread.shutdown(wait=False, cancel_futures=True)


def release_free_memory() -> None:
    """Return the C allocator's free pages to the system (glibc's malloc_trim; elsewhere nothing)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _write_request(stream: IO[bytes], name: bytes, raw: bytes) -> None:
    stream.write(_HEADER.pack(len(name), len(raw)))
    stream.write(name)
    stream.write(raw)
    stream.flush()


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise EOFError("the body parser process ended")
    return data


def _pipe(stream: IO[bytes] | None) -> IO[bytes]:
    """A pipe of the child (it is started with stdin and stdout piped)."""
    if stream is None:
        raise OSError("the body parser process has no pipe")
    return stream


def _read_frame(stream: IO[bytes]) -> Any:
    (size,) = _LENGTH.unpack(_read_exactly(stream, _LENGTH.size))
    return json.loads(_read_exactly(stream, size))


def _write_frame(stream: BinaryIO, value: Any) -> None:
    data = json.dumps(value, separators=(",", ":")).encode()
    stream.write(_LENGTH.pack(len(data)))
    stream.write(data)


# -- the answer's frames: the validated values, long lists and dicts in slices -------------------
def encode_frames(value: Any, marker: str, slice_items: int = SLICE_ITEMS) -> list[Any]:
    """`value` (plain JSON values) as frames: the first is `value` with every list or dict of
    more than SLICE_ITEMS items replaced by `{marker: number of slices, "dict": bool}`; the
    slices follow in the order `decode_frames` meets the markers (depth first: a slice, then the
    slices of what it holds), each a list of up to SLICE_ITEMS items (a dict's as [key, value])."""
    frames: list[Any] = [None]

    def encoded(node: Any) -> Any:
        is_dict = isinstance(node, dict)
        if not is_dict and not isinstance(node, list):
            return node
        items = [[key, item] for key, item in node.items()] if is_dict else node
        if len(items) <= slice_items:
            if is_dict:
                return {key: encoded(item) for key, item in items}
            return [encoded(item) for item in items]
        count = 0
        for start in range(0, len(items), slice_items):
            place = len(frames)
            frames.append(None)  # this slice's frame comes before those of what it holds
            part = items[start:start + slice_items]
            frames[place] = [[key, encoded(item)] for key, item in part] if is_dict else [encoded(i) for i in part]
            count += 1
        return {marker: count, "dict": is_dict}

    frames[0] = encoded(value)
    return frames


def decode_frames(read: Any, marker: str) -> Any:
    """The value `encode_frames` cut, from `read()` giving its frames in order."""

    def whole(node: Any) -> Any:
        if isinstance(node, dict):
            if marker in node:
                if node["dict"]:
                    return {key: whole(item) for _ in range(node[marker]) for key, item in read()}
                return [whole(item) for _ in range(node[marker]) for item in read()]
            return {key: whole(item) for key, item in node.items()}
        if isinstance(node, list):
            return [whole(item) for item in node]
        return node

    return whole(read())


def assemble(model_name: str, values: dict[str, Any]) -> BaseModel:
    """The model from values the child already validated (`model_construct`: not validated
    again), nested models included."""
    if model_name == "InitRequest":
        return InitRequest.model_construct(init_info=InitInfo.model_construct(**values["init_info"]))
    if model_name == "UpdateRequest" and "update_info" in values:
        info = values["update_info"]
        built = ([UpdateInfo.model_construct(**entry) for entry in info] if isinstance(info, list)
                 else UpdateInfo.model_construct(**info))
        return UpdateRequest.model_construct(update_info=built)
    return MODELS[model_name].model_construct(**values)


def _read_answer(child: subprocess.Popen[bytes], model_name: str, timeout: float) -> BaseModel | Invalid:
    """The child's answer to the last request, within `timeout` seconds (else it is killed)."""
    timer = threading.Timer(timeout, child.kill)  # a hung child: its pipe closes, the read ends
    timer.start()
    try:
        out = _pipe(child.stdout)
        verdict = _read_frame(out)
        if "invalid" in verdict:
            return Invalid(**verdict["invalid"])
        return assemble(model_name, decode_frames(lambda: _read_frame(out), verdict["marker"]))
    finally:
        timer.cancel()


def serve(requests: BinaryIO, answers: BinaryIO, marker: str) -> None:
    """The child's loop: validate each framed body; answer with Invalid, or with the validated
    values in frames (`encode_frames`)."""
    while True:
        head = requests.read(_HEADER.size)
        if len(head) != _HEADER.size:
            return  # the daemon closed our stdin (or ended)
        name_length, body_length = _HEADER.unpack(head)
        name = _read_exactly(requests, name_length).decode()
        raw = _read_exactly(requests, body_length)
        result = validate(name, raw) if name in MODELS else Invalid("body", f"unknown body model {name!r}")
        if isinstance(result, Invalid):
            _write_frame(answers, {"invalid": {"field": result.field, "message": result.message}})
        else:
            _write_frame(answers, {"marker": marker})
            for frame in encode_frames(result.model_dump(mode="json", exclude_unset=True), marker):
                _write_frame(answers, frame)
        answers.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer, sys.argv[1])
