"""`weightsync demo --engine sglang`: a trainer (Hugging Face transformers) and a real SGLang
server (with the weightsync plugin) as local processes, driven by the same coordinator the
operator uses (target kind `sglang`). Every round: the trainer takes a real optimisation step, the
coordinator moves the new weights into SGLang, and SGLang's greedy completions for a few prompts
must equal the trainer's HF greedy generation, token for token.

The trainer and the server run with $WEIGHTSYNC_SGLANG_PYTHON (else this Python), which must hold
`sglang==0.5.23`, transformers and `weightsync[sglang]` — the venv `make sglang-venv` builds; on a
machine without a GPU, `make demo-sglang` also puts the tests' stand-in for SGLang's kernel
package on the server's path. This process only coordinates and compares.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path

import httpx

from weightsync.tokens import TOKEN_ENV
from weightsync_operator.client import Endpoint
from weightsync_operator.coordinator import Coordinator, SyncSpec, Timeouts
from weightsync_operator.demo import qwen2
from weightsync_operator.demo.run import progress
from weightsync_operator.demo.sglang_server import PYTHON_ENV, SglangServer, sglang_python
from weightsync_operator.demo.vllm_run import MAX_TOKENS, TRAINER, VllmRound, missing_in, reference
from weightsync_operator.local import LocalProcess, free_port

NEEDED = ("sglang", "transformers", "weightsync_sglang")


async def completions(http: httpx.AsyncClient, server_url: str, prompts: list[list[int]]) -> list[list[int]]:
    """SGLang's greedy completion token ids (/generate at temperature 0, exactly MAX_TOKENS each)."""
    async def one(prompt: list[int]) -> list[int]:
        response = await http.post(server_url + "/generate", timeout=120, json={
            "input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": MAX_TOKENS,
                                                     "ignore_eos": True}})
        response.raise_for_status()
        return list(response.json()["output_ids"])

    return list(await asyncio.gather(*(one(p) for p in prompts)))


async def start_parties(work: Path, python: str, token: str, cpu: bool,
                        timeout: float = 180.0) -> tuple[LocalProcess, SglangServer]:
    """The trainer (which builds and saves the model first), then SGLang serving that checkpoint
    with the trainer's token as its admin key."""
    model_dir = str(work / "model")
    trainer = await LocalProcess.start(
        "trainer", TRAINER, ["--model", model_dir, "--build", "--backend", "cpu", "--exit-on-stdin-eof"],
        timeout, {TOKEN_ENV: token}, python=python)
    try:
        server = await SglangServer.start(model_dir, free_port(), work / "sglang", cpu=cpu, admin_key=token,
                                          python=python)
    except BaseException:
        await trainer.stop()
        raise
    return trainer, server


async def _round(number: int, coordinator: Coordinator, http: httpx.AsyncClient, trainer: LocalProcess,
                 server: SglangServer, before: list[list[int]]) -> tuple[VllmRound, dict, list[list[int]]]:
    """One training step, one sync, and SGLang's completions compared with the trainer's."""
    prompts = qwen2.prompts()
    step = (await http.post(trainer.url + "/demo/train_step", timeout=120)).json()
    result = await coordinator.sync(str(number))
    report = VllmRound(number, result)
    if result.ok:
        report.served_version = await coordinator.targets[0].weight_version(60)
        served, expected = await asyncio.gather(completions(http, server.url, prompts),
                                                reference(http, trainer.url, prompts))
        report.mismatched = [i for i, (a, b) in enumerate(zip(served, expected, strict=False)) if a != b]
        report.matches = not report.mismatched and len(served) == len(expected)
        report.changed, before = served != before, served
    return report, step, before


async def run_sglang_demo(rounds: int = 3, cpu: bool = True, work_dir: str | Path | None = None,
                          timeout: float = 60.0, python: str | None = None, say=progress) -> list[VllmRound]:
    """Run the demo; returns one report per round (a failed round does not end the demo)."""
    with tempfile.TemporaryDirectory(prefix="weightsync-sglang-demo-") as scratch:
        work = Path(work_dir or scratch)
        token = secrets.token_urlsafe(32)
        say(f"building a tiny Qwen2 model in {work / 'model'}, then starting an SGLang server on it…")
        trainer, server = await start_parties(work, python or sglang_python(), token, cpu)
        try:
            spec = SyncSpec(backend="cpu", master_port=free_port(), packed_buffer_size_bytes=1 << 20,
                            transfer_timeout=timeout, pause_mode="keep",
                            timeouts=Timeouts(init=timeout, update=timeout * 2))
            reports: list[VllmRound] = []
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http, \
                    Coordinator(trainer.endpoint, [Endpoint("sglang", server.url, kind="sglang")], spec, http,
                                token) as coordinator:
                group = await coordinator.init()
                say(f"group ready: world size {group.world_size} (trainer rank 0, SGLang's "
                    f"{group.world_size - 1} worker(s) from rank {group.ranks['sglang']})")
                before = await completions(http, server.url, qwen2.prompts())
                for number in range(1, rounds + 1):
                    report, step, before = await _round(number, coordinator, http, trainer, server, before)
                    reports.append(report)
                    say(describe(report, step))
            return reports
        finally:
            await asyncio.gather(trainer.stop(), server.stop(), return_exceptions=True)


def describe(report: VllmRound, step: dict) -> str:
    r = report.result
    head = f"round {report.round}: trained step {step.get('step')} (loss {step.get('loss', 0.0):.3f}); "
    if not r.ok:
        return head + f"sync FAILED: {r.reason}"
    verdict = ("SGLang's greedy completions now match the trainer's" if report.matches
               else f"SGLang's completions DIFFER from the trainer's on prompts {report.mismatched}")
    return (head + f"version {r.version} live in SGLang (it reports {report.served_version}), "
            f"{r.bytes:,} bytes in {r.transfer_seconds:.3f}s; {verdict}"
            f"{' (and changed since the last round)' if report.changed else ''}")


def main(rounds: int = 3) -> int:
    python = sglang_python()
    missing = missing_in(python, NEEDED)
    if missing:
        print(f"weightsync demo: error: --engine sglang runs SGLang and the trainer with {python}, which lacks "
              f"{', '.join(missing)}: run `make demo-sglang`, or set {PYTHON_ENV} to a Python with "
              f"sglang==0.5.23, transformers and weightsync[sglang]", file=sys.stderr)
        return 2
    began = time.perf_counter()
    try:
        reports = asyncio.run(run_sglang_demo(rounds, cpu=not _has_gpu(python), say=lambda m: print(m, flush=True)))
    except RuntimeError as error:  # a process that did not start: say why, in one place
        print(f"weightsync demo: {error}", file=sys.stderr)
        return 1
    verified = sum(r.verified for r in reports)
    print(f"\n{verified}/{rounds} rounds: SGLang served exactly the trainer's weights "
          f"(greedy completions equal, token for token) in {time.perf_counter() - began:.1f}s")
    return 0 if verified == rounds and len(reports) == rounds else 1


def _has_gpu(python: str) -> bool:
    """Whether `python`'s torch sees a CUDA device (else SGLang serves with its CPU engine)."""
    import subprocess

    probe = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True,
                           text=True, timeout=120)
    return probe.stdout.strip() == "True"
