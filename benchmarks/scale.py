"""The planner at scale (issue 22 item 7): real model shapes, real layouts, predicted round times.

    python benchmarks/scale.py            # every setup (a few seconds on one CPU core)
    python benchmarks/scale.py --only kimi

For each setup it writes the checkpoint's tensor list from the model's published config (and
prints its parameter count beside the published one), lays it out on the trainer (FSDP2:
every tensor `Shard(0)` over all trainer GPUs) and on the engines (vLLM replicas, TP 8, each
tensor cut by vLLM's tensor-parallel convention for its layer: the table `VLLM_TP` below; at run
time the backend learns it from vLLM itself), runs `weightsync.plan` over both and prints, for
today's single-sender round and for the plan, the bytes over the busiest link and the round time
that predicts, beside the published figures (../shared/reference: vLLM 0.33 and scale).

The network: hosts of 8 GPUs, one 400 Gb/s NIC per GPU, NVLink inside a host; trainer and
engines on different hosts, so every byte of a round crosses a NIC. A broadcast is a pipelined
chain, so each of its links carries its bytes once: the busiest link is the NIC of the trainer
rank that sends the most, or of the engine GPU that takes the most. The single-sender round
today also gathers every tensor on the trainer first (`full_tensor()`, an all-gather whose
busiest link carries (M - 1) / M of the model), one tensor at a time before sending it: its
time is the gather's plus the broadcast's. Predicted time = busiest-link bytes / (line rate ×
`LINK_EFFICIENCY`), the one factor to calibrate from measured runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from weightsync.plan import Held, Need, Plan, ReceiverLayout, fsdp_held, head_split, plan, single_owner, split, whole
from weightsync.protocol import DTYPE_SIZES, Manifest, TensorSpec

BF16 = "bfloat16"
GB = 1e9
GPUS_PER_HOST = 8
NIC_BYTES_PER_S = 400e9 / 8  # one 400 Gb/s NIC per GPU, each direction
NVLINK_BYTES_PER_S = 450e9  # H100 NVLink 4, each direction (the gather inside one host)
# The fraction of a link's line rate a round's transfers reach: not yet calibrated (the closing
# note sets it from benchmarks/transfer.py's measured nccl rounds against their hardware limit).
LINK_EFFICIENCY = 0.7

# vLLM's tensor-parallel convention per checkpoint tensor (by the last part of its name): a dim
# split across the TP workers, "heads" (k/v: split by KV heads, replicated when fewer heads than
# workers), or None (replicated: norms, routers, MLA's low-rank down projections).
COLUMN, ROW, HEADS, REPLICATED = "column", "row", "heads", "replicated"
VLLM_TP: dict[str, str] = {
    "q_proj.weight": COLUMN, "k_proj.weight": HEADS, "v_proj.weight": HEADS, "o_proj.weight": ROW,
    "gate_proj.weight": COLUMN, "up_proj.weight": COLUMN, "down_proj.weight": ROW,
    "q_b_proj.weight": COLUMN, "kv_b_proj.weight": COLUMN,  # MLA's up projections
    "q_a_proj.weight": REPLICATED, "kv_a_proj_with_mqa.weight": REPLICATED,  # ReplicatedLinear in vLLM
    "embed_tokens.weight": COLUMN, "lm_head.weight": COLUMN,  # vocab-parallel rows
    "mlp.gate.weight": REPLICATED, "e_score_correction_bias": REPLICATED,  # the MoE router
}


@dataclass(frozen=True)
class Model:
    name: str
    published_params: float  # the model card's total
    kv_heads: int
    layers: int
    tensors: Callable[[], Iterator[tuple[str, tuple[int, ...]]]]  # the checkpoint's tensors, in order


def _norms(prefix: str, hidden: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(prefix + "input_layernorm.weight", (hidden,)), (prefix + "post_attention_layernorm.weight", (hidden,))]


def _mlp(prefix: str, hidden: int, inter: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(prefix + "gate_proj.weight", (inter, hidden)), (prefix + "up_proj.weight", (inter, hidden)),
            (prefix + "down_proj.weight", (hidden, inter))]


def _attention(prefix: str, hidden: int, q: int, kv: int) -> list[tuple[str, tuple[int, ...]]]:
    """Grouped-query attention's projections: q and o `q` wide, k and v `kv` wide."""
    p = prefix + "self_attn."
    return [(p + "q_proj.weight", (q, hidden)), (p + "k_proj.weight", (kv, hidden)),
            (p + "v_proj.weight", (kv, hidden)), (p + "o_proj.weight", (hidden, q))]


def qwen3_235b() -> Iterator[tuple[str, tuple[int, ...]]]:
    """Qwen3-235B-A22B's config: 94 layers, hidden 4096, 64 q / 4 kv heads of 128 (q/k norms),
    128 experts of intermediate 1536 per layer, vocab 151936, lm_head untied."""
    hidden, head, experts, inter, vocab = 4096, 128, 128, 1536, 151936
    yield "model.embed_tokens.weight", (vocab, hidden)
    for layer in range(94):
        p = f"model.layers.{layer}."
        yield from _norms(p, hidden)
        yield from _attention(p, hidden, 64 * head, 4 * head)
        yield from [(p + "self_attn.q_norm.weight", (head,)), (p + "self_attn.k_norm.weight", (head,)),
                    (p + "mlp.gate.weight", (experts, hidden))]
        for expert in range(experts):
            yield from _mlp(f"{p}mlp.experts.{expert}.", hidden, inter)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def kimi_k2() -> Iterator[tuple[str, tuple[int, ...]]]:
    """Kimi-K2 (DeepSeek-V3's architecture): 61 layers, the first dense (intermediate 18432), hidden
    7168, 64 heads of MLA (q_lora 1536, kv_lora 512, qk_nope 128, qk_rope 64, v_head 128), 384 routed
    experts and 1 shared of intermediate 2048, vocab 163840, lm_head untied."""
    hidden, heads, q_lora, kv_lora, nope, rope, v_head = 7168, 64, 1536, 512, 128, 64, 128
    experts, inter, dense_inter, vocab = 384, 2048, 18432, 163840
    yield "model.embed_tokens.weight", (vocab, hidden)
    for layer in range(61):
        p = f"model.layers.{layer}."
        yield from _norms(p, hidden)
        yield from [(p + "self_attn.q_a_proj.weight", (q_lora, hidden)),
                    (p + "self_attn.q_a_layernorm.weight", (q_lora,)),
                    (p + "self_attn.q_b_proj.weight", (heads * (nope + rope), q_lora)),
                    (p + "self_attn.kv_a_proj_with_mqa.weight", (kv_lora + rope, hidden)),
                    (p + "self_attn.kv_a_layernorm.weight", (kv_lora,)),
                    (p + "self_attn.kv_b_proj.weight", (heads * (nope + v_head), kv_lora)),
                    (p + "self_attn.o_proj.weight", (hidden, heads * v_head))]
        if layer == 0:
            yield from _mlp(p + "mlp.", hidden, dense_inter)
            continue
        yield from [(p + "mlp.gate.weight", (experts, hidden)), (p + "mlp.gate.e_score_correction_bias", (experts,))]
        for expert in range(experts):
            yield from _mlp(f"{p}mlp.experts.{expert}.", hidden, inter)
        yield from _mlp(p + "mlp.shared_experts.", hidden, inter)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def llama31_70b() -> Iterator[tuple[str, tuple[int, ...]]]:
    """Llama-3.1-70B's config: 80 layers, hidden 8192, 64 q / 8 kv heads of 128, intermediate 28672,
    vocab 128256, lm_head untied."""
    hidden, head, inter, vocab = 8192, 128, 28672, 128256
    yield "model.embed_tokens.weight", (vocab, hidden)
    for layer in range(80):
        p = f"model.layers.{layer}."
        yield from _norms(p, hidden)
        yield from _attention(p, hidden, 64 * head, 8 * head)
        yield from _mlp(p + "mlp.", hidden, inter)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


MODELS = {
    "qwen3": Model("Qwen3-235B-A22B", 235e9, 4, 94, qwen3_235b),
    "kimi": Model("Kimi-K2", 1.04e12, 64, 61, kimi_k2),  # its technical report: 1.04 T total
    "llama": Model("Llama-3.1-70B", 70.6e9, 8, 80, llama31_70b),
}


@dataclass(frozen=True)
class Setup:
    key: str
    model: str
    trainer_hosts: int
    replicas: int  # vLLM engine replicas, each TP × PP GPUs on hosts of their own
    tp: int
    pp: int
    published: tuple[tuple[str, str], ...]  # (system: setup, figure)
    note: str = ""


SETUPS = (
    Setup("qwen3", "qwen3", 4, 4, 8, 1, (
        ("vLLM sharded RDT (NIXL), Qwen3-235B-A22B 4×8 H100", "3.49 s"),
        ("NCCL broadcast from one rank, same setup", "64.72 s")),
        "assumed: the trainer on 4 hosts, the engines on 4 others; the published setup does not say how its "
        "4×8 GPUs divide"),
    Setup("kimi", "kimi", 32, 4, 8, 4, (
        ("vLLM sharded RDT, Kimi-K2 bf16 32×8 → 16×8 H100", "7.53 s (7.9 TB)"),
        ("Perplexity RDMA, Kimi-K2 256 bf16 → 128 fp8 GPUs", "1.3 s"),
        ("miles (Mooncake), Kimi 1T fp8, 512 GPUs", "7 s"),
        ("checkpoint-engine, Kimi-K2, thousands of GPUs", "~20 s")),
        "bf16 Kimi-K2 (2 TB) does not fit one TP8 replica of 80 GB GPUs: each replica is TP8 × PP4 (32 GPUs); "
        "4 replicas land 8.2 TB, as the published 7.9 TB"),
    Setup("llama", "llama", 4, 16, 8, 1, (), "the issue's example layout; no published figure"),
)


def tp_rule(name: str) -> str:
    for suffix, rule in VLLM_TP.items():
        if name.endswith(suffix):
            return rule
    return REPLICATED  # norms and anything not listed: whole


def need(spec: TensorSpec, rule: str, rank: int, tp: int, kv_heads: int) -> Need:
    if rule == COLUMN:
        return split(spec.shape, spec.dtype, 0, rank, tp)
    if rule == ROW:
        return split(spec.shape, spec.dtype, 1, rank, tp)
    if rule == HEADS:
        return head_split(spec.shape, spec.dtype, 0, rank, tp, kv_heads)
    return whole(spec.shape, spec.dtype)


def stage_of(name: str, layers: int, pp: int) -> int:
    """The pipeline stage serving a tensor: layers spread evenly, embeddings first, head last."""
    if ".layers." in name:
        return int(name.split(".layers.")[1].split(".")[0]) * pp // layers
    return 0 if "embed_tokens" in name else pp - 1


def engine_layouts(manifest: Manifest, model: Model, setup: Setup) -> dict[int, ReceiverLayout]:
    """Every engine GPU's needs, receiver id = (replica × PP + stage) × TP + TP rank. The same
    (stage, TP rank) of every replica shares one layout object (the planner groups them)."""
    by_position: dict[tuple[int, int], dict[str, Need]] = {
        (stage, rank): {} for stage in range(setup.pp) for rank in range(setup.tp)}
    cuts: dict[tuple[tuple[int, ...], str], list[Need]] = {}  # the TP ranks' needs, per shape and rule
    for spec in manifest.tensors:
        stage, rule = stage_of(spec.name, model.layers, setup.pp), tp_rule(spec.name)
        needs = cuts.get((spec.shape, rule))
        if needs is None:
            needs = cuts[spec.shape, rule] = [need(spec, rule, rank, setup.tp, model.kv_heads)
                                              for rank in range(setup.tp)]
        for rank, wanted in enumerate(needs):
            by_position[stage, rank][spec.name] = wanted
    per_replica = setup.pp * setup.tp
    return {replica * per_replica + stage * setup.tp + rank: by_position[stage, rank]
            for replica in range(setup.replicas) for stage in range(setup.pp) for rank in range(setup.tp)}


@dataclass(frozen=True)
class Row:
    path: str
    landed: float  # bytes the engine GPUs receive, all together
    busiest: float  # bytes over the busiest link
    link: str
    seconds: float
    transfers: int
    broadcasts: int
    streams: int  # distinct (sender, receivers) pairs: what a transport packs each into one stream


def counts(result: Plan) -> tuple[int, int, int]:
    """Transfers, broadcasts and (sender, receivers) streams of a plan (tensors sharing their
    transfers are looked at once)."""
    usage = Counter(id(tensor.transfers) for tensor in result.tensors)
    distinct = {id(tensor.transfers): tensor.transfers for tensor in result.tensors}
    transfers = sum(len(distinct[key]) * used for key, used in usage.items())
    broadcasts = sum(sum(len(t.receivers) > 1 for t in distinct[key]) * used for key, used in usage.items())
    streams = len({(t.source, t.receivers) for transfers in distinct.values() for t in transfers})
    return transfers, broadcasts, streams


def busiest(result: Plan) -> tuple[float, str]:
    sender = max(result.sent, key=lambda rank: (result.sent[rank], -rank))
    receiver = max(result.received, key=lambda rank: (result.received[rank], -rank))
    if result.sent[sender] >= result.received[receiver]:
        return result.sent[sender], f"trainer GPU {sender} NIC out"
    return result.received[receiver], f"engine GPU {receiver} NIC in"


def link_seconds(nbytes: float, efficiency: float, rate: float = NIC_BYTES_PER_S) -> float:
    return nbytes / (rate * efficiency)


def single_sender_row(manifest: Manifest, setup: Setup, engines: int, efficiency: float) -> Row:
    """Today: every tensor gathered on the trainer, rank 0 broadcasts it whole to every engine GPU."""
    trainer = {spec.name: single_owner(spec.shape, spec.dtype) for spec in manifest.tensors}
    whole_model = {spec.name: whole(spec.shape, spec.dtype) for spec in manifest.tensors}
    result = plan(trainer, dict.fromkeys(range(engines), whole_model))
    ranks = setup.trainer_hosts * GPUS_PER_HOST
    gathered = manifest.nbytes * (ranks - 1) / ranks
    gather_rate = NVLINK_BYTES_PER_S if setup.trainer_hosts == 1 else NIC_BYTES_PER_S
    heaviest, link = busiest(result)
    transfers, broadcasts, streams = counts(result)
    seconds = link_seconds(gathered, efficiency, gather_rate) + link_seconds(heaviest, efficiency)
    return Row("single sender (today): gather + broadcast", sum(result.received.values()), heaviest,
               link + " (+ the gather)", seconds, transfers, broadcasts, streams)


def plan_row(manifest: Manifest, model: Model, setup: Setup, efficiency: float) -> tuple[Row, Plan, float]:
    started = time.perf_counter()
    trainer: dict[str, Held] = {}
    shard = fsdp_held(setup.trainer_hosts * GPUS_PER_HOST)
    for spec in manifest.tensors:
        trainer[spec.name] = shard(spec)
    result = plan(trainer, engine_layouts(manifest, model, setup))
    elapsed = time.perf_counter() - started
    heaviest, link = busiest(result)
    transfers, broadcasts, streams = counts(result)
    landed = sum(result.received.values())
    row = Row(f"plan: {len(result.sent)} senders, no gather", landed, heaviest, link,
              link_seconds(heaviest, efficiency), transfers, broadcasts, streams)
    return row, result, elapsed


def model_manifest(model: Model) -> Manifest:
    return Manifest(tensors=tuple(TensorSpec(name=name, dtype=BF16, shape=shape) for name, shape in model.tensors()))


def report(setup: Setup, efficiency: float) -> None:
    model = MODELS[setup.model]
    manifest = model_manifest(model)
    params = manifest.nbytes / DTYPE_SIZES[BF16]
    ratio = params / model.published_params
    engines = setup.replicas * setup.pp * setup.tp
    engine_shape = f"{setup.replicas} × vLLM TP{setup.tp}" + (f"×PP{setup.pp}" if setup.pp > 1 else "")
    print(f"\n== {model.name}: {params / 1e9:,.1f} B parameters (published {model.published_params / 1e9:,.1f} B, "
          f"{ratio:.3f}×), {len(manifest.tensors):,} tensors, {manifest.nbytes / GB:,.0f} GB bf16")
    print(f"   trainer FSDP2 Shard(0) over {setup.trainer_hosts}×{GPUS_PER_HOST} GPUs → {engine_shape} "
          f"({engines // GPUS_PER_HOST}×{GPUS_PER_HOST} GPUs)")
    if not 0.95 <= ratio <= 1.05:
        raise SystemExit(f"{model.name}: the tensor list's total is off the published count by more than 5 %")
    planned, result, elapsed = plan_row(manifest, model, setup, efficiency)
    rows = [single_sender_row(manifest, setup, engines, efficiency), planned]
    if setup.note:
        print(f"   ({setup.note})")
    print(f"   {'path':<44}{'landed':>10}{'busiest link':>14}  {'(which)':<38}{'predicted':>10}{'transfers':>13}"
          f"{'broadcasts':>12}{'streams':>9}")
    for row in rows:
        print(f"   {row.path:<44}{row.landed / 1e12:>8.2f}TB{row.busiest / GB:>11.1f} GB  {row.link:<38}"
              f"{row.seconds:>9.2f}s{row.transfers:>13,}{row.broadcasts:>12,}{row.streams:>9,}")
    sent, received = sorted(result.sent.values()), sorted(result.received.values())
    print(f"   plan: derived in {elapsed:.2f} s; per trainer GPU {sent[0] / GB:.2f}–{sent[-1] / GB:.2f} GB sent, "
          f"per engine GPU {received[0] / GB:.1f}–{received[-1] / GB:.1f} GB received; "
          f"fingerprint {result.fingerprint[:16]}")
    print(f"   floor for this engine layout: each engine host takes {received[-1] * GPUS_PER_HOST / GB:,.0f} GB over "
          f"{GPUS_PER_HOST} NICs = {received[-1] / NIC_BYTES_PER_S:.2f} s at line rate")
    print(f"   plan vs single sender: {rows[0].seconds / planned.seconds:.0f}× faster predicted; fp8 on the wire "
          f"(converted on the way, as Perplexity does) would halve it: {planned.seconds / 2:.2f} s")
    for system, figure in setup.published:
        print(f"   published  {system:<56}{figure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=[setup.key for setup in SETUPS], action="append",
                        help="one setup (repeatable); default all")
    parser.add_argument("--efficiency", type=float, default=None,
                        help=f"the fraction of line rate a round reaches (default LINK_EFFICIENCY, {LINK_EFFICIENCY})")
    args = parser.parse_args(argv)
    efficiency = LINK_EFFICIENCY if args.efficiency is None else args.efficiency
    print(f"network: {GPUS_PER_HOST} GPUs per host, one {NIC_BYTES_PER_S * 8 / 1e9:.0f} Gb/s NIC each, NVLink "
          f"{NVLINK_BYTES_PER_S / GB:.0f} GB/s inside a host; predicted = busiest-link bytes / (line rate × "
          f"efficiency {efficiency}{'' if args.efficiency else ', LINK_EFFICIENCY: uncalibrated'})")
    for setup in SETUPS:
        if args.only is None or setup.key in args.only:
            report(setup, efficiency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
