"""The loader sink (weightsync.landing) over real gloo groups (threads of this process, and a
trainer process for the kill): each tensor handed over once, bit-exact, in manifest order, fused
groups whole, staging bounded; refusals before anything loads; failures say what was touched."""

from __future__ import annotations

import json
import os
import pathlib
import random
import subprocess
import sys
import threading
import time

import pytest
import torch

from weightsync import InitInfo, ManifestMismatch, SparsePatch, TransferError, UpdateInfo, WeightSender
from weightsync.errors import IntegrityError
from weightsync.landing import LoaderSink, StagedLoad, StagingPlan, group_by_module
from weightsync.layout import Layout
from weightsync.protocol import Manifest, TensorSpec
from weightsync.transports import get_transport
from weightsync_operator.local import free_port

pytestmark = pytest.mark.integration  # gloo groups of threads and a trainer process
BUFFER, BUFFERS = 4096, 3  # 12 KiB of staging: several tensors are larger than one buffer
HELPERS = pathlib.Path(__file__).resolve().parents[1] / "helpers"


def model(seed: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype)

    return [
        ("model.embed_tokens.weight", randn(1500)),  # 6000 bytes: spans two buffers
        ("model.layers.0.self_attn.q_proj.weight", randn(20, 20)),
        ("model.layers.0.self_attn.k_proj.weight", randn(30, 10, dtype=torch.bfloat16)),
        ("model.layers.0.self_attn.v_proj.bias", randn(7, dtype=torch.float16)),  # 14 bytes
        ("model.layers.0.mlp.gate_proj.weight", randn(1000)),
        ("model.layers.0.mlp.up_proj.weight", randn(1000)),  # gate/up/down: 8 KiB together
        ("model.layers.0.mlp.down_proj.scale", torch.randint(-128, 127, (333,), dtype=torch.int8, generator=gen)),
        ("model.layers.0.input_layernorm.weight", randn(64)),
        ("model.layers.1.self_attn.q_proj.weight", randn(900)),
        ("model.layers.1.self_attn.k_proj.weight", randn(5, dtype=torch.float16)),
        ("model.norm.weight", randn(64)),
        ("lm_head.weight", randn(1200)),  # 4800 bytes: larger than a buffer, last
    ]


def runs(names: list[str], group_of=group_by_module) -> list[list[str]]:
    """The fused groups: runs of consecutive names with the same key."""
    out: list[list[str]] = []
    for name in names:
        if out and group_of(out[-1][-1]) == group_of(name):
            out[-1].append(name)
        else:
            out.append([name])
    return out


class Recorder:
    """A loader: copies what it is handed (the views are valid only during the call) and notes
    each batch and the memory every view lives in."""

    def __init__(self, check=lambda manifest: None, fail_after: int | None = None, **options):
        self.batches: list[list[str]] = []
        self.values: dict[str, torch.Tensor] = {}
        self.storages: set[tuple[int, int]] = set()
        self.fail_after = fail_after
        self.sink = LoaderSink(self.load, check, **options)

    def load(self, batch):
        if self.fail_after is not None and sum(map(len, self.batches)) >= self.fail_after:
            raise RuntimeError("the engine's loader broke")
        self.batches.append([name for name, _ in batch])
        for name, view in batch:
            assert name not in self.values, f"{name} handed over twice"
            self.values[name] = view.clone()
            storage = view.untyped_storage()
            self.storages.add((storage.data_ptr(), storage.nbytes()))

    @property
    def names(self) -> list[str]:
        return [name for batch in self.batches for name in batch]


def base(port: int, world: int, **extra) -> dict:
    return {"backend": "cpu", "master_address": "127.0.0.1", "master_port": port, "world_size": world,
            "packed_buffer_size_bytes": BUFFER, "packed_num_buffers": BUFFERS, "timeout_seconds": 20, **extra}


class Receivers:
    """Receiver transports on threads of this process, each taking rounds into its own sink."""

    def __init__(self, init: dict, sinks: list, receivers_init: dict | None = None):
        self.transports = [None] * len(sinks)
        self.sinks = sinks
        self.init = {**init, **(receivers_init or {})}

    def connect(self):
        threads = [threading.Thread(target=self._connect, args=(i,)) for i in range(len(self.sinks))]
        for thread in threads:
            thread.start()
        return threads

    def _connect(self, i):
        self.transports[i] = get_transport("cpu").connect(InitInfo(**self.init, rank_offset=i + 1), i + 1)

    def round(self, send):
        """One round: the trainer's `send()` here, every receiver on its thread; every outcome."""
        outcomes: list[object] = [None] * len(self.sinks)

        def receive(i):
            try:
                outcomes[i] = self.transports[i].receive(self.sinks[i], UpdateInfo())
            except Exception as error:  # noqa: BLE001 - the test inspects it
                outcomes[i] = error

        threads = [threading.Thread(target=receive, args=(i,)) for i in range(len(self.sinks))]
        for thread in threads:
            thread.start()
        try:
            sent = send()
        except Exception as error:  # noqa: BLE001 - the test inspects it
            sent = error
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive(), "a receiver did not return within its bound"
        return sent, outcomes

    def close(self):
        for transport in self.transports:
            if transport is not None:
                transport.close()


def group(port: int, sinks: list, receivers_init: dict | None = None, **extra):
    receivers = Receivers(base(port, len(sinks) + 1, **extra), sinks, receivers_init)
    threads = receivers.connect()
    sender = WeightSender.init(base(port, len(sinks) + 1, **extra))
    for thread in threads:
        thread.join(60)
    return sender, receivers


def staging_held(transport) -> int:
    """Bytes of staging the receiver transport holds (every buffer it allocated)."""
    staging = transport.receiver.staging
    flat = staging.flat
    return (flat.numel() if flat is not None else 0) + sum(
        b.numel() for b in staging.buffers if flat is None or b.untyped_storage().data_ptr() != flat.data_ptr())


def count_in_flight(transport, loader: Recorder) -> list[int]:
    """At each load, how many of this receiver's broadcasts were started and not yet waited for."""
    original, state, seen = transport.group.broadcast, {"open": 0}, []

    def broadcast(tensor, src=0):
        pending = original(tensor, src)
        state["open"] += 1

        class Counted:
            def wait(self):
                pending.wait()
                state["open"] -= 1

        return Counted()

    transport.group.broadcast = broadcast
    load = loader.sink.load
    loader.sink.load = lambda batch: (seen.append(state["open"]), load(batch))[1]
    return seen


def test_every_tensor_is_loaded_once_bit_exact_in_order_with_groups_whole_and_staging_bounded():
    port = free_port()
    loaders = [Recorder(), Recorder()]
    sender, receivers = group(port, [r.sink for r in loaders])
    bound = BUFFER * BUFFERS
    in_flight = count_in_flight(receivers.transports[0], loaders[0])
    try:
        for seed in (1, 2, 3):  # the later rounds reuse the cached header and staging plan
            named = model(seed)
            for loader in loaders:
                loader.batches, loader.values, loader.storages = [], {}, set()
            sent, outcomes = receivers.round(lambda named=named: sender.send_weights(named))
            assert not isinstance(sent, BaseException), sent
            assert sent.num_chunks > 4  # the 4 KiB buffers really split the stream
            names = [name for name, _ in named]
            for loader, stats in zip(loaders, outcomes, strict=True):
                assert not isinstance(stats, BaseException), stats
                assert stats.checksum == sent.checksum
                assert loader.names == names  # each exactly once, in manifest order
                assert len(loader.batches) > 2  # handed over as the chunks came in, not at the end
                for name, tensor in named:
                    got = loader.values[name]
                    assert got.dtype == tensor.dtype and got.shape == tensor.shape
                    assert torch.equal(got.view(torch.uint8), tensor.view(torch.uint8)), name
                batch_of = {name: k for k, batch in enumerate(loader.batches) for name in batch}
                for fused in runs(names):
                    assert len({batch_of[name] for name in fused}) == 1, f"group {fused} split"
                assert loader.sink.loaded_tensors == len(named)
                # every view handed over lives in the transport's staging, which stays within the bound
                assert all(nbytes <= bound for _, nbytes in loader.storages), loader.storages
            for transport, loader in zip(receivers.transports, loaders, strict=True):
                assert staging_held(transport) <= bound
                assert loader.sink.staging_bytes <= bound
                staging_ptr = transport.receiver.staging.flat.untyped_storage().data_ptr()
                assert {ptr for ptr, _ in loader.storages} == {staging_ptr}
            # loading overlaps receiving: loads ran while later chunks were on their way (this tight
            # staging makes the chunks after a moved prefix wait: test_piecewise_staging... for 7B)
            assert sum(open_ > 0 for open_ in in_flight) >= 2, in_flight
            in_flight.clear()
    finally:
        sender.close()
        receivers.close()


def test_a_refused_manifest_loads_nothing_anywhere_and_every_party_names_the_parameter():
    port = free_port()
    refusing = Recorder(check=lambda m: next((f"parameter {s.name!r} has no place in this engine"
                                              for s in m.tensors if s.name == "lm_head.weight"), None))
    loaders = [Recorder(), refusing]
    sender, receivers = group(port, [r.sink for r in loaders])
    try:
        sent, outcomes = receivers.round(lambda: sender.send_weights(model(1)))
        for outcome in [sent, *outcomes]:
            assert isinstance(outcome, ManifestMismatch), outcome
            assert "lm_head.weight" in str(outcome)
        assert all(loader.batches == [] and loader.sink.loaded_tensors == 0 for loader in loaders)
        # the group stays usable: a manifest both accept lands
        named = [(n, t) for n, t in model(2) if n != "lm_head.weight"]
        sent, outcomes = receivers.round(lambda: sender.send_weights(named))
        assert not isinstance(sent, BaseException) and all(not isinstance(o, BaseException) for o in outcomes)
        assert all(loader.names == [n for n, _ in named] for loader in loaders)
    finally:
        sender.close()
        receivers.close()


def test_a_round_larger_than_the_staging_bound_is_refused_at_the_start_naming_tensor_and_bound():
    port = free_port()
    loaders = [Recorder()]
    sender, receivers = group(port, [r.sink for r in loaders])
    try:
        named = model(1) + [("model.huge.weight", torch.ones(4000))]  # 16000 bytes > 12 KiB of staging
        sent, outcomes = receivers.round(lambda: sender.send_weights(named))
        for outcome in (sent, outcomes[0]):
            assert isinstance(outcome, ManifestMismatch), outcome
            assert "model.huge.weight" in str(outcome) and str(BUFFER * BUFFERS) in str(outcome)
        assert loaders[0].sink.loaded_tensors == 0
        assert staging_held(receivers.transports[0]) <= BUFFER * BUFFERS
    finally:
        sender.close()
        receivers.close()


def corrupt_chunk(transport, number: int) -> None:
    """Flip a byte of the `number`-th payload chunk this receiver takes in, once it landed (a bit
    lost on the way): the round's checksum must catch it. (Broadcast 1 of a round is its header.)"""
    original = transport.group.broadcast
    seen = {"n": 0}

    def broadcast(tensor, src=0):
        pending = original(tensor, src)
        seen["n"] += 1
        if seen["n"] != number + 1:
            return pending

        class Corrupted:
            def wait(self):
                pending.wait()
                tensor[0] ^= 0xFF

        return Corrupted()

    transport.group.broadcast = broadcast
    transport.uncorrupted = lambda: setattr(transport.group, "broadcast", original)


def test_a_checksum_mismatch_after_some_loads_reports_the_weights_touched():
    port = free_port()
    loaders = [Recorder(), Recorder()]
    sender, receivers = group(port, [r.sink for r in loaders])
    try:
        corrupt_chunk(receivers.transports[1], 4)
        sent, outcomes = receivers.round(lambda: sender.send_weights(model(1)))
        assert isinstance(sent, TransferError) and "checksum mismatch" in str(sent)
        assert isinstance(outcomes[1], IntegrityError) and outcomes[1].weights_touched
        assert loaders[1].sink.loaded_tensors > 0
        assert isinstance(outcomes[0], TransferError) and outcomes[0].weights_touched  # it loaded all
    finally:
        sender.close()
        receivers.close()


def test_a_loader_that_fails_mid_round_fails_the_round_everywhere_and_the_group_goes_on():
    port = free_port()
    loaders = [Recorder(fail_after=3), Recorder()]
    sender, receivers = group(port, [r.sink for r in loaders])
    try:
        sent, outcomes = receivers.round(lambda: sender.send_weights(model(1)))
        assert isinstance(sent, TransferError) and "loader broke" in str(sent)
        assert isinstance(outcomes[0], TransferError) and outcomes[0].weights_touched
        assert isinstance(outcomes[1], TransferError)
        loaders[0].fail_after = None
        for loader in loaders:
            loader.batches, loader.values = [], {}
        named = model(2)
        sent, outcomes = receivers.round(lambda: sender.send_weights(named))
        assert not isinstance(sent, BaseException), sent
        assert all(loader.names == [n for n, _ in named] for loader in loaders)
    finally:
        sender.close()
        receivers.close()


def test_atomic_loads_nothing_before_the_round_verified():
    port = free_port()
    loaders = [Recorder(), Recorder()]
    sender, receivers = group(port, [r.sink for r in loaders], receivers_init={"atomic": True})
    verified: list[bool] = [False, False]
    try:
        for i, transport in enumerate(receivers.transports):
            agreement = transport.receiver.agreement
            exchange = agreement.exchange

            def after_verdicts(*args, _i=i, _exchange=exchange):
                outcome = _exchange(*args)
                verified[_i] = True
                return outcome

            agreement.exchange = after_verdicts
            load = loaders[i].load
            loaders[i].sink.load = lambda batch, _i=i, _load=load: (
                pytest.fail("loaded before the round verified") if not verified[_i] else _load(batch))
        corrupt_chunk(receivers.transports[1], 3)
        sent, outcomes = receivers.round(lambda: sender.send_weights(model(1)))
        assert isinstance(outcomes[1], IntegrityError) and not outcomes[1].weights_touched
        assert isinstance(outcomes[0], TransferError) and not outcomes[0].weights_touched
        assert all(loader.batches == [] for loader in loaders)
        receivers.transports[1].uncorrupted()
        verified[:] = [False, False]
        named = model(2)
        sent, outcomes = receivers.round(lambda: sender.send_weights(named))
        assert not isinstance(sent, BaseException), sent
        for loader in loaders:
            assert loader.names == [n for n, _ in named] and len(loader.batches) == 1  # all at once, verified
            assert all(torch.equal(loader.values[n].view(torch.uint8), t.view(torch.uint8)) for n, t in named)
    finally:
        sender.close()
        receivers.close()


def test_sparse_rounds_are_refused_by_a_loader_without_sparse_support_and_applied_by_one_with():
    port = free_port()
    patches_seen: list = []
    plain = Recorder()
    sparse = Recorder(supports_sparse=True, load_sparse=lambda patches: patches_seen.append(
        [(name, i.clone(), v.clone()) for name, i, v in patches]))
    sender, receivers = group(port, [plain.sink])
    patch = SparsePatch("model.norm.weight", torch.tensor([0, 5, 9]), torch.tensor([1.0, 2.0, 3.0]))
    try:
        sent, outcomes = receivers.round(lambda: sender.send_sparse([patch]))
        for outcome in (sent, outcomes[0]):
            assert isinstance(outcome, ManifestMismatch) and "sparse" in str(outcome), outcome
        assert plain.sink.loaded_tensors == 0 and plain.batches == []
        receivers.sinks = [sparse.sink]
        sent, outcomes = receivers.round(lambda: sender.send_sparse([patch]))
        assert not isinstance(outcomes[0], BaseException), outcomes[0]
        ((name, indices, values),) = patches_seen[0]
        assert name == "model.norm.weight" and indices.tolist() == [0, 5, 9] and values.tolist() == [1.0, 2.0, 3.0]
    finally:
        sender.close()
        receivers.close()


def test_the_trainer_killed_mid_round_after_some_loads_reports_the_weights_touched():
    port = free_port()
    init = {"backend": "cpu", "master_address": "127.0.0.1", "master_port": port, "world_size": 2,
            "timeout_seconds": 4.0, "packed_buffer_size_bytes": 65536, "packed_num_buffers": 2}
    loader = Recorder(group_of=lambda name: name)  # each tensor loads as soon as its bytes are in
    trainer = subprocess.Popen([sys.executable, str(HELPERS / "slow_trainer.py"), "--init", json.dumps(init),
                                "--delay", "0.2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    transport = None
    try:
        transport = get_transport("cpu").connect(InitInfo(**init, rank_offset=1), 1)
        first = transport.receive(loader.sink, UpdateInfo())
        assert loader.sink.loaded_tensors == 16 and first.checksum
        assert json.loads(trainer.stdout.readline())["sent"] == first.checksum
        outcome: list[object] = []
        thread = threading.Thread(target=lambda: outcome.append(_receive_or_error(transport, loader.sink)))
        thread.start()
        trainer.stdin.write(b"go\n")
        trainer.stdin.flush()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # kill it once several chunks went out
            line = json.loads(trainer.stdout.readline())
            if line.get("broadcasts", 0) >= 6:
                break
        trainer.kill()
        killed = time.monotonic()
        thread.join(init["timeout_seconds"] + 10)
        assert not thread.is_alive()
        assert time.monotonic() - killed < init["timeout_seconds"] + 10
        (error,) = outcome
        assert isinstance(error, TransferError), error
        assert error.weights_touched and 0 < loader.sink.loaded_tensors < 16
    finally:
        trainer.kill()
        trainer.wait(10)
        if transport is not None:
            transport.close()


def _receive_or_error(transport, sink):
    try:
        return transport.receive(sink, UpdateInfo())
    except Exception as error:  # noqa: BLE001 - the test inspects it
        return error


def random_round(rng: random.Random, buffer: int) -> tuple[Manifest, Layout, list, dict[str, str]]:
    """A random loader round: sizes (empty tensors too), fused groups (runs of one key), chunks
    (ramped or not)."""
    sizes = [rng.choice([0, 1, 7, 100, 256, 1000, 3000, 6000]) for _ in range(rng.randint(1, 25))]
    keys: list[str] = []
    for i in range(len(sizes)):
        keys.append(keys[-1] if keys and rng.random() < 0.4 else str(i))
    manifest = Manifest(tensors=tuple(TensorSpec(name=f"t{i}", dtype="uint8", shape=(s,)) for i, s in enumerate(sizes)))
    layout = Layout.of_sizes(sizes)
    round_chunks = layout.chunks(buffer, ramp=rng.random() < 0.5)
    return manifest, layout, round_chunks, dict(zip(manifest.names, keys, strict=True))


def fits_the_stated_rule(layout: Layout, chunks, keys: list[str], capacity: int) -> bool:
    """The rule the refusal states, checked byte by byte: when a chunk is received, the stream
    from the first byte of every fused group begun before it and not yet complete (its last
    byte not yet received), aligned down, to the chunk's end fits in the staging area."""
    groups: dict[int, list[int]] = {}
    group = -1
    for i, key in enumerate(keys):
        group = group + 1 if i == 0 or key != keys[i - 1] else group
        groups.setdefault(group, []).append(i)
    spans = []  # (first byte, one past the last byte) of each group with bytes
    for members in groups.values():
        filled = [i for i in members if layout.sizes[i]]
        if filled:
            spans.append((layout.offsets[filled[0]], max(layout.offsets[i] + layout.sizes[i] for i in filled)))
    for chunk in chunks:
        held = [first for first, end in spans if first < chunk.start < end]
        base = min(held, default=chunk.start) // layout.alignment * layout.alignment
        if chunk.stop - base > capacity:
            return False
    return True


def play(plan: StagingPlan, manifest: Manifest, layout: Layout, chunks, sink: LoaderSink, handed: list,
         piecewise: bool, depth: int) -> None:
    """Run the plan with each chunk written the moment it is posted (the earliest a receive
    could write it): every tensor handed over, once and in order, must hold its stream bytes."""
    area = torch.zeros(plan.capacity, dtype=torch.uint8)
    stream = torch.randint(0, 256, (layout.total_bytes,), dtype=torch.uint8)
    staged = StagedLoad(plan, area, manifest, chunks, layout, verify=False)

    def post(number):
        chunk = chunks[number]
        if plan.positions[number] >= 0:  # the whole chunk, padding included
            staged.view(number).copy_(stream[chunk.start : chunk.stop])
            return number
        for piece, s in zip(staged.pieces[number], [s for s in chunk.segments if s.nbytes], strict=True):
            piece.copy_(stream[chunk.start + s.chunk_offset : chunk.start + s.chunk_offset + s.nbytes])
        return number

    assert staged.run(post, lambda handle: None, sink, None, depth=depth) is None
    assert [name for name, _ in handed] == manifest.names
    for (name, got), offset, nbytes in zip(handed, layout.offsets, layout.sizes, strict=True):
        assert torch.equal(got, stream[offset : offset + nbytes]), name


def test_staging_plans_hand_every_tensor_exactly_once_and_never_overwrite_what_is_not_loaded():
    """Many random layouts, staged contiguously and piecewise, played at random depths."""
    rng = random.Random(7)
    accepted = {False: 0, True: 0}
    for trial in range(800):
        piecewise = trial % 2 == 1  # each piece received on its own (nccl direct, p2p)
        size = rng.choice([256, 1024, 4096])
        count = rng.randint(1, 5)
        manifest, layout, chunks, key_of = random_round(rng, size)
        handed: list[tuple[str, torch.Tensor]] = []
        sink = LoaderSink(lambda b, handed=handed: handed.extend((n, t.clone()) for n, t in b), lambda m: None,
                          group_of=key_of.__getitem__)
        try:
            plan = StagingPlan.build(layout, chunks, count * size, manifest.names, sink.run_ends(manifest),
                                     piecewise)
        except TransferError as error:
            assert "staging" in str(error)
            continue
        accepted[piecewise] += 1
        assert plan.peak <= count * size
        play(plan, manifest, layout, chunks, sink, handed, piecewise, depth=rng.randint(1, count + 1))
    assert min(accepted.values()) > 100, accepted


def test_staging_accepts_every_layout_within_the_stated_rule_and_refuses_the_others_naming_the_group():
    """Property test (seeded, over 3000 random layouts) against the exact check of the rule the
    refusal states (`fits_the_stated_rule`): a layout is staged iff it fits (piecewise: at
    least then), and every plan accepted lands every tensor. Before, the greedy planner refused
    layouts that fit, e.g. a Llama whose fused gate/up group is 23.6 MB in 2 x 64 MiB."""
    rng = random.Random(21)
    verdicts = {True: 0, False: 0}
    for trial in range(3000):
        piecewise = trial % 3 == 2
        size = rng.choice([256, 1024, 4096])
        capacity = size * rng.randint(1, 4)
        manifest, layout, chunks, key_of = random_round(rng, size)
        handed: list[tuple[str, torch.Tensor]] = []
        sink = LoaderSink(lambda b, handed=handed: handed.extend((n, t.clone()) for n, t in b), lambda m: None,
                          group_of=key_of.__getitem__)
        fits = fits_the_stated_rule(layout, chunks, [key_of[n] for n in manifest.names], capacity)
        verdicts[fits] += 1
        try:
            plan = StagingPlan.build(layout, chunks, capacity, manifest.names, sink.run_ends(manifest), piecewise)
        except TransferError as error:
            assert not fits, f"trial {trial}: a layout within the rule was refused: {error}"
            assert "fused group" in str(error) and f"the {capacity} bytes of loader staging" in str(error)
            continue
        assert fits or piecewise, f"trial {trial}: a contiguous plan beyond the rule"
        assert plan.peak <= capacity
        play(plan, manifest, layout, chunks, sink, handed, piecewise, depth=rng.randint(1, 4))
    assert min(verdicts.values()) > 500, verdicts  # both sides of the rule are well sampled

    manifest = Manifest(tensors=tuple(TensorSpec(name=n, dtype="bfloat16", shape=s)
                                      for n, s in llama_shapes(hidden=1536, intermediate=3840, layers=4)))
    layout = Layout.of_manifest(manifest)
    sink = LoaderSink(lambda batch: None, lambda m: None, group_of=fused_key)
    plan = StagingPlan.build(layout, layout.chunks(64 << 20), 128 << 20, manifest.names, sink.run_ends(manifest))
    assert plan.peak <= 128 << 20


def llama_shapes(hidden: int, intermediate: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """A Llama's checkpoint shapes (grouped-query attention, 8 KV heads of 128, vocab 32000)."""
    shapes = [("model.embed_tokens.weight", (32000, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (256, hidden)),
                   (p + "self_attn.v_proj.weight", (256, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (intermediate, hidden)),
                   (p + "mlp.up_proj.weight", (intermediate, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, intermediate)), (p + "input_layernorm.weight", (hidden,)),
                   (p + "post_attention_layernorm.weight", (hidden,))]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (32000, hidden))]


def fused_key(name: str) -> str:
    """vLLM's fusion of a Llama: q/k/v, and gate/up, load together."""
    module = name.rsplit(".", 1)[0]
    for members, fused in ((("q_proj", "k_proj", "v_proj"), "qkv"), (("gate_proj", "up_proj"), "gate_up")):
        if module.rsplit(".", 1)[-1] in members:
            return module.rsplit(".", 1)[0] + "." + fused
    return module


def test_piecewise_staging_takes_a_7b_layout_at_the_default_buffers_and_bounds_what_it_refuses():
    """nccl's direct rounds place each tensor on its own: Qwen2-7B's shapes (fused MLP groups of
    408 MB) stage in 1 GiB x 2, and contiguously too; a tensor over the bound is named."""
    from benchmarks.transfer import qwen2_shapes

    manifest = Manifest(tensors=tuple(TensorSpec(name=n, dtype="bfloat16", shape=s) for n, s in qwen2_shapes()))
    layout = Layout.of_manifest(manifest)
    chunks = layout.chunks(1 << 30, ramp=True)
    sink = LoaderSink(lambda batch: None, lambda m: None)
    plan = StagingPlan.build(layout, chunks, 2 << 30, manifest.names, sink.run_ends(manifest), piecewise=True)
    assert plan.peak <= 2 << 30
    assert sum(plan.after[j] >= j - 1 for j in range(len(chunks))) < len(chunks)  # chunks overlap loads
    contiguous = StagingPlan.build(layout, chunks, 2 << 30, manifest.names, sink.run_ends(manifest))
    assert contiguous.peak <= 2 << 30 and contiguous.carries  # held bytes move to the area's start
    with pytest.raises(TransferError, match="model.embed_tokens.weight.*1073741824 bytes"):
        StagingPlan.build(layout, layout.chunks(256 << 20, ramp=True), 1 << 30, manifest.names,
                          sink.run_ends(manifest), piecewise=True)
