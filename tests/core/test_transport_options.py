"""Transport options (init_info.options): typed, agreed by every party at init, and the only way a
choice changes what travels or how. Real gloo groups in threads of this process; the GPU
transports' option models are checked as models (their groups need GPUs)."""

from __future__ import annotations

import ast
import asyncio
import json
import socket
import threading
from pathlib import Path

import pytest
import torch

from weightsync import InitInfo, UpdateInfo, WeightSender, WeightStore
from weightsync.errors import OptionMismatch, ProtocolError
from weightsync.protocol import RoundHeader, parse
from weightsync.rendezvous import agree_options
from weightsync.transports import get_transport
from weightsync.transports.collective import agree_options_over_group
from weightsync.transports.cpu import CpuOptions, GlooGroup
from weightsync.transports.ipc import IpcOptions
from weightsync.transports.nccl import NcclOptions, NcclRoundHeader
from weightsync.transports.options import TransportOptions
from weightsync.transports.p2p import P2pOptions

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _base(world_size: int) -> dict:
    return {"backend": "cpu", "master_address": "127.0.0.1", "master_port": _free_port(),
            "world_size": world_size, "timeout_seconds": 20, "init_timeout_seconds": 20}


def _join_all(inits: list[InitInfo]) -> list[object]:
    """Every party's `connect` at once, one thread each: the transport, or what it raised."""
    results: list[object] = [None] * len(inits)

    def join(rank: int) -> None:
        try:
            results[rank] = get_transport("cpu").connect(inits[rank], rank)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            results[rank] = error

    threads = [threading.Thread(target=join, args=(rank,)) for rank in range(len(inits))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a join did not end within its bound"
    return results


def _close(results: list[object]) -> None:
    for result in results:
        if hasattr(result, "close"):
            result.close()


@pytest.mark.integration  # gloo groups joined over a rendezvous
def test_a_mismatched_option_fails_init_on_every_party_naming_it_and_both_values():
    """The trainer and rank 1 ramp, rank 2 does not: all three refuse the group at init (never a
    timeout or a corrupted round later), each naming the option, the rank and both values."""
    base = _base(3)
    inits = [InitInfo(**base, options={"ramp": True}), InitInfo(**base, rank_offset=1, options={"ramp": True}),
             InitInfo(**base, rank_offset=2)]
    results = _join_all(inits)
    try:
        for rank, result in enumerate(results):
            assert isinstance(result, OptionMismatch), (rank, result)
            assert result.field == "init_info.options.ramp"
            assert "rank 2 has false, the trainer (rank 0) has true" in str(result)
            assert "rank 1" not in str(result)  # it agreed
    finally:
        _close(results)
    # The same parties with the same options join, and a round moves (the refusal left nothing behind).
    base = _base(2)
    results = _join_all([InitInfo(**base, options={"ramp": True}),
                         InitInfo(**base, rank_offset=1, options={"ramp": True})])
    try:
        assert all(not isinstance(r, Exception) for r in results), results
        _round(*results, _weights(1))
    finally:
        _close(results)


def test_an_unknown_or_invalid_option_is_refused_before_joining_naming_the_field():
    base = _base(2)
    with pytest.raises(ProtocolError) as unknown:
        get_transport("cpu").connect(InitInfo(**base, options={"packed": True}), 0)  # an nccl option
    assert unknown.value.field == "init_info.options.packed"
    with pytest.raises(ProtocolError) as wrong:
        get_transport("cpu").connect(InitInfo(**base, options={"ramp": "sometimes"}), 0)
    assert wrong.value.field == "init_info.options.ramp"
    with pytest.raises(ProtocolError) as bad:
        parse(InitInfo, {**base, "options": {"x": [1]}}, "init_info")
    assert bad.value.field.startswith("init_info.options.x")


def _weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(f"layer.{i}.weight", torch.randn(1024, 1024 + i, generator=gen)) for i in range(5)]


def _round(trainer, receiver, named):
    store = WeightStore.from_tensors([(n, torch.zeros_like(t)) for n, t in named])
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(receiver.receive(store, UpdateInfo())))
    thread.start()
    sent = trainer.send(named)
    thread.join(60)
    assert not thread.is_alive() and got, "the receiver did not finish its round"
    assert got[0].checksum == sent.checksum
    assert all(torch.equal(store[n], t) for n, t in named)  # bit-exact
    return sent


@pytest.mark.integration  # gloo groups joined over a rendezvous
def test_ramp_changes_where_chunks_end_and_nothing_else():
    """`ramp` (cpu default off): the first chunks grow from a quarter buffer and the last ones
    shrink; the bytes and the checksum are the same either way."""
    stats = {}
    for ramp in (False, True):
        base = {**_base(2), "packed_buffer_size_bytes": 4 * MiB, "packed_num_buffers": 2}
        options = {} if not ramp else {"ramp": True}
        trainer, receiver = _join_all([InitInfo(**base, options=options),
                                       InitInfo(**base, rank_offset=1, options=options)])
        try:
            assert trainer.options.ramp is ramp and receiver.options.ramp is ramp
            stats[ramp] = _round(trainer, receiver, _weights(7))
        finally:
            trainer.close()
            receiver.close()
    total = stats[False].payload_bytes
    assert stats[False].num_chunks == -(-total // (4 * MiB))  # every chunk a full buffer
    assert stats[True].num_chunks > stats[False].num_chunks  # 1 MiB, 2 MiB, ... then shrinking
    assert stats[True].checksum == stats[False].checksum


@pytest.mark.integration  # gloo groups joined over a rendezvous
def test_a_group_without_a_store_agrees_its_options_over_the_group_itself():
    """(nccl from a trainer-minted id has no store) the options travel as an all-gather over the
    group: both parties of a gloo group compare them the same way and refuse a difference."""
    base = _base(2)
    groups: list[object] = [None, None]

    def make(rank: int) -> None:
        groups[rank] = GlooGroup(InitInfo(**base, rank_offset=rank), rank)

    threads = [threading.Thread(target=make, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    outcomes: list[object] = [None, None]
    try:
        for options in ([CpuOptions(), CpuOptions()], [CpuOptions(ramp=True), CpuOptions()]):
            def agree(rank: int, options: list[CpuOptions] = options) -> None:
                try:
                    agree_options_over_group(groups[rank], options[rank])
                    outcomes[rank] = "agreed"
                except Exception as error:  # noqa: BLE001 - the test inspects it
                    outcomes[rank] = error

            threads = [threading.Thread(target=agree, args=(r,)) for r in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            if options[0] == options[1]:
                assert outcomes == ["agreed", "agreed"]
            else:
                for outcome in outcomes:
                    assert isinstance(outcome, OptionMismatch) and outcome.field == "init_info.options.ramp"
                    assert "rank 1 has false, the trainer (rank 0) has true" in str(outcome)
    finally:
        for group in groups:
            if group is not None:
                group.close()


ENV_DEFAULTS = [  # (model, option, variable, a value for the variable, the option's value then)
    (NcclOptions, "packed", "WEIGHTSYNC_NCCL_PACKED", "1", True),
    (NcclOptions, "lead", "WEIGHTSYNC_NCCL_LEAD", "0", False),
    (NcclOptions, "control", "WEIGHTSYNC_CONTROL", "nccl", "communicator"),
    (IpcOptions, "verify", "WEIGHTSYNC_IPC_VERIFY", "full", "full"),
]


@pytest.mark.parametrize("model, option, variable, raw, value", ENV_DEFAULTS)
def test_an_environment_variable_only_sets_a_default_which_is_agreed(monkeypatch, model, option, variable, raw,
                                                                     value):
    """A process whose environment sets a default joins with that value, an explicit option
    wins over it, and a party without the variable is refused at init naming the option."""
    init = InitInfo(world_size=2, master_address="127.0.0.1", master_port=1)
    plain = model.of(init)
    assert getattr(plain, option) != value
    monkeypatch.setenv(variable, raw)
    assert getattr(model.of(init), option) == value
    explicit = getattr(plain, option)
    assert getattr(model.of(init.model_copy(update={"options": {option: explicit}})), option) == explicit
    with pytest.raises(OptionMismatch) as refused:
        agree_options([plain.agreed(), model.of(init).agreed()])
    assert refused.value.field == f"init_info.options.{option}"
    assert f"rank 1 has {json.dumps(value)}, the trainer (rank 0) has {json.dumps(explicit)}" in str(refused.value)
    monkeypatch.setenv(variable, "bogus")
    with pytest.raises(ValueError, match=variable):
        model.of(init)


def test_no_weightsync_variable_is_read_except_as_an_option_default():
    """Scan weightsync/: the environment is read in one place (options.env_default's factory)
    by the NCCL library lookup (which libnccl this process loads: nothing a peer sees), by the
    bearer token's lookup (a secret: it authenticates HTTP calls, never changes the wire) and by
    an engine worker's metrics port (where its own /metrics listens: nothing a peer sees).
    Every env_default names a WEIGHTSYNC_* variable and is the default_factory of a field of a
    TransportOptions model; each of those is covered by ENV_DEFAULTS above."""
    allowed_reads = {("weightsync/transports/options.py", "factory"), ("weightsync/transports/nccl_lib.py", "library"),
                     ("weightsync/tokens.py", "load_token"), ("weightsync/metrics.py", "metrics_port")}
    reads, defaults = set(), set()
    for path in sorted((ROOT / "weightsync").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

        def enclosing(node, kind, parents=parents):
            while node in parents:
                node = parents[node]
                if isinstance(node, kind):
                    return node
            return None

        for node in ast.walk(tree):
            is_environ = isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv") \
                and isinstance(node.value, ast.Name) and node.value.id == "os"
            if is_environ or (isinstance(node, ast.Name) and node.id in ("environ", "getenv")):
                function = enclosing(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                reads.add((rel, function.name if function else "<module>"))
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "env_default":
                variable = node.args[0]
                assert isinstance(variable, ast.Constant) and variable.value.startswith("WEIGHTSYNC_"), rel
                keyword = enclosing(node, ast.keyword)
                assert keyword is not None and keyword.arg == "default_factory", (rel, variable.value)
                cls = enclosing(node, ast.ClassDef)
                assert cls is not None and cls.name.endswith("Options"), (rel, variable.value)
                defaults.add(variable.value)
    assert reads <= allowed_reads, f"environment read outside an option default: {sorted(reads - allowed_reads)}"
    assert defaults == {variable for _, _, variable, _, _ in ENV_DEFAULTS}


def test_every_transport_has_a_typed_options_model_whose_defaults_are_documented():
    for name, model in (("cpu", CpuOptions), ("nccl", NcclOptions), ("ipc", IpcOptions), ("p2p", P2pOptions)):
        assert get_transport(name).options_model is model and issubclass(model, TransportOptions)
        model.of(InitInfo(world_size=1, master_address="127.0.0.1", master_port=1))  # defaults are valid
    source = (ROOT / "weightsync/transports/nccl.py").read_text()
    assert "SOURCE_SUM_PROGRAMS" not in source and "os.environ" not in source
    # One value per transport, each a documented field default (not one variable meaning two).
    assert NcclOptions.model_fields["source_sum_programs"].default == 32
    assert P2pOptions.model_fields["source_sum_programs"].default == 8


def test_nccl_header_fields_live_with_nccl_and_decoding_stays_strict():
    header = {"round_id": "r1", "manifest": {"tensors": [{"name": "w", "dtype": "float32", "shape": [2]}]},
              "buffer_size_bytes": 1024, "num_buffers": 2, "alignment": 256, "direct": True, "lead": True}
    nccl = parse(NcclRoundHeader, header, "header")
    assert nccl.direct and nccl.lead
    with pytest.raises(ProtocolError) as refused:  # the core header (the cpu transport's) has no such field
        parse(RoundHeader, header, "header")
    assert refused.value.field in ("header.direct", "header.lead")
    assert "direct" not in RoundHeader.model_fields and "lead" not in RoundHeader.model_fields
    assert get_transport("cpu").header_model is RoundHeader
    assert get_transport("nccl").header_model is NcclRoundHeader


@pytest.mark.asyncio
async def test_a_daemon_refuses_a_group_whose_trainer_joined_with_other_options(spawn, http):
    """Over HTTP, with a real daemon process: the daemon answers 422 naming the option and both
    values, the trainer's init fails with the same facts, and the daemon joins the next group
    whose options agree (it stayed usable)."""
    daemon = await spawn("daemon-options")
    base = _base(2)
    trainer = asyncio.to_thread(WeightSender.init, {**base, "options": {"ramp": True}})
    answer = http.post(daemon.url + "/init_weight_transfer_engine", json={"init_info": {**base, "rank_offset": 1}})
    sent, answer = await asyncio.gather(trainer, answer, return_exceptions=True)
    assert isinstance(sent, OptionMismatch) and "rank 1 has false, the trainer (rank 0) has true" in str(sent)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == "init_info.options.ramp"
    assert "rank 1 has false, the trainer (rank 0) has true" in answer.json()["detail"]
    base = {**_base(2), "options": {"ramp": True}}
    trainer = asyncio.to_thread(WeightSender.init, base)
    answer = http.post(daemon.url + "/init_weight_transfer_engine", json={"init_info": {**base, "rank_offset": 1}})
    sender, answer = await asyncio.gather(trainer, answer)
    try:
        assert answer.status_code == 200, answer.text
        assert sender.transport.options.ramp
    finally:
        sender.close()
