"""The parts of the collective round on their own (no group, no process): the verdict slots, the
round header's encoding against its decoding (whole, then by name once agreed, refused by a
receiver that does not hold it), and the facade's one side per rank."""

from __future__ import annotations

import json

import pytest
import torch

from weightsync.dtypes import tensors_manifest
from weightsync.errors import ProtocolError, TransferError
from weightsync.integrity import DIGEST_BYTES
from weightsync.protocol import InitInfo, RoundHeader, UpdateInfo
from weightsync.transports.collective import Group, Party
from weightsync.transports.collective.agreement import SLOT_BYTES, Agreement, decode_slots, encode_slot
from weightsync.transports.collective.round_header import HeaderDecoder, HeaderEncoder, UnknownHeader
from weightsync.transports.cpu import CpuTransport
from weightsync.transports.nccl import NcclRoundHeader

INIT = InitInfo(world_size=2, master_address="127.0.0.1", master_port=1)


def test_verdict_slots_carry_each_message_and_checksum_and_name_who_objects():
    digest = bytes(range(DIGEST_BYTES))
    rows = [encode_slot(None, digest), encode_slot("shape differs", digest), encode_slot("shape differs"),
            encode_slot("x" * 5000, digest[::-1])]
    assert all(len(row) == SLOT_BYTES for row in rows)
    verdicts = decode_slots(rows, with_digest=True)
    assert verdicts.objections() == ["rank 1, 2: shape differs", f"rank 3: {'x' * 1023}"]  # cut to the slot
    assert verdicts.checksum_mismatches() == [2, 3]
    assert "rank 2: checksum mismatch" in verdicts.checksum_failures()[0]
    with pytest.raises(TransferError, match="carried 3 bytes"):
        decode_slots([b"abc"], with_digest=False)


def _header(round_id: str, names=("a.weight", "b.weight"), model=RoundHeader, **fields) -> RoundHeader:
    manifest = tensors_manifest([(name, torch.zeros(3, 2)) for name in names])
    return model(round_id=round_id, manifest=manifest, buffer_size_bytes=4096, num_buffers=2, alignment=256,
                 **fields)


def test_a_header_goes_whole_until_agreed_then_by_name_and_an_unknown_name_is_refused():
    party = Party(INIT, 0, torch.device("cpu"), group=None)
    encoder = HeaderEncoder(party, Agreement(party))
    decoder = HeaderDecoder(party, Agreement(party), RoundHeader)
    first = _header("r1")
    whole = encoder.encode(first)
    assert json.loads(whole)["manifest"] == json.loads(first.model_dump_json())["manifest"]
    assert decoder.decode(whole) == first
    encoder.agreed()
    second = first.model_copy(update={"round_id": "r2"})
    named = encoder.encode(second, lead=[512, 64])
    body = json.loads(named)
    assert set(body) == {"round_id", "repeat_of", "lead_pieces"} and len(named) < 200  # the name only
    assert body["round_id"] == "r2" and body["lead_pieces"] == [512, 64] and len(body["repeat_of"]) == 32
    assert decoder.decode(named) == second
    decoder.forget()
    assert decoder.decode(named) == UnknownHeader([512, 64])  # it still takes part in the lead chunk
    encoder.refused()
    assert b"manifest" in encoder.encode(second.model_copy(update={"round_id": "r3"}))  # whole again
    other = _header("r4", names=("c.weight",))
    assert decoder.decode(encoder.encode(other)) == other


def test_headers_decode_strictly_with_the_transports_model():
    party = Party(INIT, 1, torch.device("cpu"), group=None)
    nccl = _header("r1", model=NcclRoundHeader, direct=True, lead=True)
    data = HeaderEncoder(party, Agreement(party)).encode(nccl)
    assert HeaderDecoder(party, Agreement(party), NcclRoundHeader).decode(data) == nccl
    with pytest.raises(ProtocolError, match="header.direct|header.lead"):
        HeaderDecoder(party, Agreement(party), RoundHeader).decode(data)
    with pytest.raises(TransferError, match="not JSON"):
        HeaderDecoder(party, Agreement(party), RoundHeader).decode(b'{"round_id":"r1", nope')


class _Unused(Group):
    """A group the facade holds but never reaches (each call below is refused before it would)."""

    rank, world_size, device = 0, 2, torch.device("cpu")

    def broadcast(self, tensor, src=0):
        raise AssertionError("no collective expected")

    def all_gather(self, tensor):
        raise AssertionError("no collective expected")

    def close(self) -> None:
        pass


def test_rank_zero_holds_the_sender_and_every_other_rank_a_receiver():
    trainer = CpuTransport(INIT, 0, torch.device("cpu"), _Unused())
    receiver = CpuTransport(INIT, 1, torch.device("cpu"), _Unused())
    assert trainer.sender is not None and trainer.receiver is None
    assert receiver.receiver is not None and receiver.sender is None
    with pytest.raises(TransferError, match="only rank 0"):
        receiver.send([("w", torch.zeros(2))])
    with pytest.raises(TransferError, match="does not receive"):
        trainer.receive(None, UpdateInfo())
    trainer.init = INIT.model_copy(update={"packed_buffer_size_bytes": 8192})  # read live by every part
    assert trainer.party.init.packed_buffer_size_bytes == 8192
