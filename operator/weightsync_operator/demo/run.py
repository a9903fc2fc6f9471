"""`weightsync demo`: a trainer and N inference daemons as local processes, driven by the same
coordinator the Kubernetes operator uses. After every round it proves each daemon holds exactly
the trainer's weights (checksums) and computes exactly the trainer's outputs (forward pass)."""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from dataclasses import dataclass

import httpx

from weightsync.tokens import TOKEN_ENV
from weightsync_operator.coordinator import Coordinator, SyncResult, SyncSpec, Timeouts
from weightsync_operator.demo.hardware import place
from weightsync_operator.local import LocalProcess, free_port, stop_all

WORKER = "weightsync_operator.demo.worker"


@dataclass
class RoundReport:
    round: int
    result: SyncResult
    checksums_match: bool
    outputs_match: bool
    detail: str = ""

    @property
    def verified(self) -> bool:
        return self.result.ok and self.checksums_match and self.outputs_match


async def _post(http: httpx.AsyncClient, url: str, path: str, body: dict | None = None) -> dict:
    response = await http.post(url + path, json=body or {}, timeout=60)
    response.raise_for_status()
    return response.json()


async def verify(http: httpx.AsyncClient, trainer: LocalProcess, daemons: list[LocalProcess]) -> tuple[bool, bool, str]:
    """Compare every daemon's weights and forward output with the trainer's, bit for bit."""
    parties = [trainer, *daemons]
    sums = await asyncio.gather(*(_post(http, p.url, "/weight_checker", {"action": "checksum"}) for p in parties))
    outs = await asyncio.gather(*(_post(http, p.url, "/demo/forward") for p in parties))
    bad_sums = [d.name for d, s in zip(daemons, sums[1:], strict=True) if s["checksum"] != sums[0]["checksum"]]
    bad_outs = [d.name for d, o in zip(daemons, outs[1:], strict=True)
                if o["output_sha256"] != outs[0]["output_sha256"]]
    problems = [f"weights differ on {bad_sums}"] if bad_sums else []
    problems += [f"outputs differ on {bad_outs}"] if bad_outs else []
    detail = "; ".join(problems)
    return not bad_sums, not bad_outs, detail


def progress(message: str) -> None:
    """One live status line on a terminal; plain lines otherwise (logs, CI)."""
    if sys.stdout.isatty():
        sys.stdout.write("\r\033[K" + message)
        sys.stdout.flush()
    else:
        print(message, flush=True)


def format_table(reports: list[RoundReport]) -> str:
    header = f"{'round':>5}  {'version':>7}  {'bytes':>12}  {'seconds':>8}  {'MB/s':>9}  verified"
    lines = [header, "-" * len(header)]
    for r in reports:
        res = r.result
        mbps = res.bytes / res.transfer_seconds / 1e6 if res.transfer_seconds else 0.0
        verdict = "yes" if r.verified else f"NO ({res.reason or r.detail})"
        lines.append(f"{r.round:>5}  {res.version:>7}  {res.bytes:>12,}  {res.transfer_seconds:>8.3f}  "
                     f"{mbps:>9.1f}  {verdict}")
    return "\n".join(lines)


async def run_demo(daemons: int = 2, rounds: int = 5, backend: str = "cpu",
                   buffer_size: int = 1 << 20, num_buffers: int = 2, timeout: float = 60.0) -> list[RoundReport]:
    placement = place(backend, daemons)
    backend = placement.backend
    progress(f"starting a trainer and {daemons} daemons ({backend} backend)…")
    # --exit-on-stdin-eof: the workers end with this process even if it is killed outright.
    worker_args = ["--backend", backend, "--exit-on-stdin-eof"]

    def device_args(device: str | None) -> list[str]:
        return ["--device", device] if device else []
    token = secrets.token_urlsafe(32)  # every party requires it on its mutating endpoints
    env = {TOKEN_ENV: token}
    trainer_task = LocalProcess.start("trainer", WORKER, ["--role", "trainer", "--seed", "0", *worker_args,
                                                          *device_args(placement.trainer_device)], timeout, env)
    daemon_tasks = [LocalProcess.start(f"daemon-{i}", WORKER, ["--role", "inference", "--seed", str(i + 1),
                                                              *worker_args, *device_args(device)], timeout, env)
                    for i, device in enumerate(placement.daemon_devices)]
    started = await asyncio.gather(trainer_task, *daemon_tasks, return_exceptions=True)
    processes = [p for p in started if isinstance(p, LocalProcess)]
    try:
        failures = [e for e in started if isinstance(e, BaseException)]
        if failures:
            raise failures[0]
        trainer, targets = processes[0], processes[1:]
        spec = SyncSpec(backend=backend, master_port=free_port(), packed_buffer_size_bytes=buffer_size,
                        packed_num_buffers=num_buffers, transfer_timeout=timeout,
                        timeouts=Timeouts(init=timeout, update=timeout * 2))
        reports: list[RoundReport] = []
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(headers=headers) as http, \
                Coordinator(trainer.endpoint, [t.endpoint for t in targets], spec, http, token) as coordinator:
            group = await coordinator.init()
            progress(f"group ready: world size {group.world_size}, rendezvous :{group.master_port}")
            for number in range(1, rounds + 1):
                step = await _post(http, trainer.url, "/demo/train_step")
                progress(f"round {number}/{rounds}: trained step {step['step']} (loss {step['loss']:.4f}), syncing…")
                result = await coordinator.sync(f"{number}")
                sums_ok, outs_ok, detail = await verify(http, trainer, targets) if result.ok else (False, False, "")
                report = RoundReport(number, result, sums_ok, outs_ok, detail)
                reports.append(report)
                progress(f"round {number}/{rounds}: {result.bytes:,} bytes in {result.transfer_seconds:.3f}s, "
                         f"{'verified' if report.verified else 'NOT verified'}")
        if sys.stdout.isatty():
            print()
        return reports
    finally:
        await stop_all(processes)


def main(daemons: int, rounds: int, backend: str, buffer_size: int, num_buffers: int) -> int:
    began = time.perf_counter()
    reports = asyncio.run(run_demo(daemons, rounds, backend, buffer_size, num_buffers))
    print(format_table(reports))
    ok = all(r.verified for r in reports) and len(reports) == rounds
    print(f"\n{sum(r.verified for r in reports)}/{rounds} rounds verified bit-exact across {daemons} "
          f"daemon{'' if daemons == 1 else 's'} "
          f"in {time.perf_counter() - began:.1f}s")
    return 0 if ok else 1
