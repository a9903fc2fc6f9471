"""VLLMTrainer's own logic, without a server (issue 23 items 2 and 3): a push's pause mode is
checked before anything is called, and vLLM's error answers reach the trainer as the worker's
reason, once. The real server's answer is checked in tests/engines/test_vllm_e2e.py
(test_mismatched_manifest_is_refused); the body here has the shape vLLM 0.32 and 0.33 answer
with (`ErrorResponse`: {"error": {"message", "type", "param", "code"}}), the message wrapped
by vLLM's engine core and its multiprocess executor.
"""

from __future__ import annotations

import json

import pytest

from weightsync.errors import ProtocolError
from weightsync_vllm.trainer import DEFAULT_PAUSE_MODE, VLLMTrainer, round_failure, vllm_reason

REASON = ("weightsync update refused: parameter 'model.layers.0.self_attn.k_proj.weight' has shape [64, 128] "
          "in the served model's checkpoint but [64, 127] from the trainer; vLLM keeps serving the previous "
          "weights, intact (nothing of this round was loaded)")
WRAPPED = (f"Call to update_weights method failed: Worker failed with error '{REASON}', please check the stack "
           "trace above for the root cause")
BODY = json.dumps({"error": {"message": WRAPPED, "type": "InternalServerError", "param": None, "code": 500}})


def test_the_workers_reason_is_taken_out_of_vllms_wrappers():
    assert vllm_reason(BODY) == REASON
    assert vllm_reason(json.dumps({"error": "plain"})) == "plain"
    assert vllm_reason("not json at all ") == "not json at all"


def test_a_refused_round_says_its_reason_once():
    """The trainer's own error (the same refusal) is dropped where vLLM's answers say it."""
    trainer_error = ProtocolError("manifest", REASON.split(": ", 1)[1].split(";")[0])
    message = round_failure(trainer_error, [f"http://vllm-0:8000/update_weights: HTTP 500: {REASON}"])
    assert message.count("has shape [64, 128]") == 1 and "stack trace" not in message, message
    assert "http://vllm-0:8000" in message and "intact" in message


def test_a_trainer_failure_vllm_does_not_explain_keeps_both():
    answers = ["", "http://vllm-1:8000/update_weights: HTTP 500: boom"]
    message = round_failure(TimeoutError("the group timed out"), answers)
    assert "the group timed out" in message and "boom" in message


def test_the_default_pause_mode_does_not_wait_for_rollouts():
    assert DEFAULT_PAUSE_MODE == "keep"


@pytest.mark.parametrize("mode", ["later", "none", ""])
def test_a_pause_mode_vllm_does_not_have_is_refused_naming_the_field(mode):
    trainer = VLLMTrainer(sender=None, endpoints=[], init=None)  # refused before either is used
    with pytest.raises(ProtocolError) as refused:
        trainer.push([], pause_mode=mode)
    assert refused.value.field == "pause_mode" and "abort, wait, keep" in str(refused.value)
