"""The round header on the wire: the trainer's encoding (with its cache) and the receivers'
decoding (with theirs).

The header is JSON whose first key is the round id. All but the round id is cached on both
ends: the trainer re-encodes only when the manifest or plan changed, a receiver re-parses only
when the bytes after the round id changed (hundreds of tensors take about a millisecond to
validate). Once every receiver agreed to a header, the trainer sends only its name:
`{"round_id": ..., "repeat_of": <fingerprint>, "lead_pieces": [...]}`; a receiver that does not
hold that header refuses the round (`UnknownHeader`), and the next header goes out whole.

Over a control store the header is one key set together with the trainer's first verdict;
over the group it is a broadcast of one fixed block (and one more when it is longer).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from weightsync.errors import TransferError
from weightsync.protocol import Manifest, RoundHeader, parse
from weightsync.transports.collective.agreement import Agreement, StoreEntry
from weightsync.transports.collective.group import Party
from weightsync.transports.collective.trace import mark

LEAD_MAX_PIECES = 64  # a round moves ahead of its agreement only a first chunk of this few pieces
HEADER_BLOCK = 64 << 10  # the header's first broadcast; longer headers take one more
MAX_HEADER_BYTES = 1 << 28
_PREFIX = b'{"round_id":"'
_REPEAT_OF = b'","repeat_of":"'  # what follows the round id in a header sent by name


def fingerprint(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=16).hexdigest()


def _json(data: bytes) -> Any:
    """The header's JSON; TransferError when it is none."""
    try:
        return json.loads(data)
    except ValueError as error:
        raise TransferError(f"round header is not JSON: {error}") from None


@dataclass(frozen=True)
class UnknownHeader:
    """The trainer named a header (by fingerprint) that this receiver does not hold. It still
    takes part in the broadcasts that move ahead of the agreement (`lead_pieces`, byte counts)."""

    lead_pieces: list[int]


@dataclass(frozen=True)
class _Encoded:
    """The trainer's last encoding: for a header whose fields but the round id equal `key`'s."""

    key: tuple[Any, ...]
    body: bytes  # the JSON after the round id
    manifest: Manifest
    fingerprint: str


class HeaderEncoder:
    """Trainer side: encode each round's header (by name once every receiver agreed to it) and
    send it. Its own object so that the caches of the encoding sit beside the only code that
    reads them."""

    def __init__(self, party: Party, agreement: Agreement):
        self._party = party
        self._agreement = agreement
        self._encoded: _Encoded | None = None
        self._agreed_body: bytes | None = None  # the body the receivers last agreed to

    def agreed(self) -> None:
        """Every receiver accepted the header last sent: the next equal one goes by name."""
        assert self._encoded is not None  # agreed on the header `send` encoded
        self._agreed_body = self._encoded.body

    def refused(self) -> None:
        """A receiver refused the header last sent: the next one goes out whole."""
        self._agreed_body = None

    def encode(self, header: RoundHeader, lead: Sequence[int] = ()) -> bytes:
        """The header's JSON; all but the round id is cached per manifest and plan. `lead`: the
        byte counts of the broadcasts that go ahead of the agreement (see `RoundRules.lead_pieces`);
        a header sent by name carries them, so that a receiver not holding it can still take part."""
        key = (id(header.manifest), type(header),
               *(value for name, value in header if name not in ("round_id", "manifest")))
        cached = self._encoded
        if cached is None or cached.key != key or cached.manifest is not header.manifest:
            full = header.model_dump_json().encode()
            body = full[full.index(b'"', 13):]
            cached = self._encoded = _Encoded(key, body, header.manifest, fingerprint(body))
        if self._agreed_body is cached.body:  # every receiver holds this header: name it only
            return b'{"round_id":"%s","repeat_of":"%s","lead_pieces":%s}' % (
                header.round_id.encode(), cached.fingerprint.encode(), json.dumps(list(lead)).encode())
        return _PREFIX + header.round_id.encode() + cached.body

    def send(self, header: RoundHeader, lead: Sequence[int] = ()) -> StoreEntry | None:
        """Broadcast the header over the group; over a store, return the entry for the agreement
        to set together with the trainer's verdict."""
        data = self.encode(header, lead)
        group = self._party.group
        if getattr(group, "control_store", None) is not None:
            return StoreEntry(self._agreement.next_header_key(), data)
        block = torch.zeros(HEADER_BLOCK, dtype=torch.uint8)
        block[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
        first = data[: HEADER_BLOCK - 8]
        block[8 : 8 + len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
        on_device = group.to_device(block)
        mark("header: on device")
        pending = group.broadcast(on_device)
        mark("header: broadcast called")
        pending.wait()
        mark("header: sent")
        if len(data) > len(first):
            rest = torch.frombuffer(bytearray(data[len(first):]), dtype=torch.uint8)
            group.broadcast(group.to_device(rest)).wait()
        return None


@dataclass(frozen=True)
class _Held:
    """The last header this receiver parsed from whole bytes: the bytes after its round id."""

    body: bytes
    header: RoundHeader
    fingerprint: str


@dataclass(frozen=True)
class _Parsed:
    """The last header validated from JSON, and the JSON it came from."""

    raw: object
    header: RoundHeader


class HeaderDecoder:
    """Receiver side: receive the trainer's header and decode it strictly with the transport's
    `header_model`, reusing the last one when only the round id changed."""

    def __init__(self, party: Party, agreement: Agreement, header_model: type[RoundHeader]):
        self._party = party
        self._agreement = agreement
        self._header_model = header_model
        self._held: _Held | None = None
        self._parsed: _Parsed | None = None

    def forget(self) -> None:
        """Drop the header this receiver holds: a round that names it is then refused."""
        self._held = None

    def receive(self) -> RoundHeader | UnknownHeader:
        """The next round's header, over the control store or the group (bounded)."""
        group = self._party.group
        control = getattr(group, "control_store", None)
        if control is not None:
            key = self._agreement.next_header_key()
            try:
                data = control.get(key)  # blocks until it is there, at most the group's timeout
            except Exception as error:  # the store raises on its timeout
                group.fail()
                raise TransferError(f"no round header came within {self._party.init.timeout_seconds:g}s: "
                                    f"{error}") from error
            mark("header: received")
            return self.decode(data)
        block = group.empty(HEADER_BLOCK)
        pending = group.broadcast(block)
        mark("header: broadcast called")
        pending.wait()
        mark("header: received")
        host = group.to_host(block)
        size = int(host[:8].view(torch.int64).item())
        if not 0 < size <= MAX_HEADER_BYTES:
            raise TransferError(f"round header of {size} bytes is out of range")
        data = bytes(host[8 : 8 + min(size, HEADER_BLOCK - 8)].numpy())
        if size > HEADER_BLOCK - 8:
            rest = group.empty(size - len(data))
            group.broadcast(rest).wait()
            data += bytes(group.to_host(rest).numpy())
        return self.decode(data)

    def decode(self, data: bytes) -> RoundHeader | UnknownHeader:
        """Parse a header; one equal, byte for byte, to the last one but for its round id is
        reused without parsing. A header that only names the last one ("repeat_of", sent once
        every receiver agreed to it) is that one with a new round id; `UnknownHeader` when this
        receiver does not hold it."""
        end = data.find(b'"', len(_PREFIX)) if data.startswith(_PREFIX) else -1
        if end > len(_PREFIX) and data[end:].startswith(_REPEAT_OF) and len(data) <= 4096:
            return self._by_name(data)
        reused = self._same_body(data, end) if end > len(_PREFIX) else None
        if reused is not None:
            mark("header: parsed")
            return reused
        header = self._parse(_json(data))
        if end > len(_PREFIX):
            self._held = _Held(data[end:], header, fingerprint(data[end:]))
        mark("header: parsed")
        return header

    def _by_name(self, data: bytes) -> RoundHeader | UnknownHeader:
        """A header sent by name (`HeaderEncoder.encode`): the held one under the new round id,
        or `UnknownHeader` (with the lead pieces to take part in) when this receiver holds
        another one or none."""
        raw = _json(data)
        round_id, repeat_of, lead = raw.get("round_id"), raw.get("repeat_of"), raw.get("lead_pieces", [])
        if not (isinstance(round_id, str) and round_id.isalnum() and len(round_id) <= 64):
            raise TransferError("round header: round_id must be 1-64 letters or digits")
        if not (isinstance(lead, list) and len(lead) <= LEAD_MAX_PIECES
                and all(type(n) is int and n > 0 for n in lead)):
            raise TransferError(f"round header: lead_pieces must be a list of at most {LEAD_MAX_PIECES} "
                                "positive byte counts")
        held = self._held
        if held is None or repeat_of != held.fingerprint:
            return UnknownHeader(lead)
        mark("header: parsed")
        return held.header.model_copy(update={"round_id": round_id})

    def _same_body(self, data: bytes, end: int) -> RoundHeader | None:
        """The held header under this one's round id, when the bytes after the round id (from
        `end`) are the held ones and the round id is valid; None: parse it whole."""
        held = self._held
        if held is None or data[end:] != held.body:
            return None
        round_id = data[len(_PREFIX) : end].decode("ascii", errors="replace")
        if not (round_id.isalnum() and len(round_id) <= 64):
            return None
        return held.header.model_copy(update={"round_id": round_id})

    def _parse(self, raw: object) -> RoundHeader:
        """Validate a header; a header equal to the last one but for its round id is reused
        (validating a manifest of hundreds of tensors costs about a millisecond)."""
        if isinstance(raw, dict) and self._parsed is not None:
            round_id = raw.get("round_id")
            cached = self._parsed
            if isinstance(round_id, str) and 0 < len(round_id) <= 64 and \
                    {**raw, "round_id": cached.header.round_id} == cached.raw:
                return cached.header.model_copy(update={"round_id": round_id})
        header = parse(self._header_model, raw, "header")
        self._parsed = _Parsed(raw, header)
        return header
