"""A tiny Qwen2-architecture language model, built locally (no hub), that both a real vLLM
server and a Hugging Face transformers trainer can run — so that after each round the two can
be compared token for token.

Sizes obey what vLLM's CPU backend needs (head_dim >= 32). Everything is float32: greedy
decoding in bf16 already differs between HF and vLLM before any update. Prompts are token ids
(the server runs with `--skip-tokenizer-init`): no tokenizer to build or trust.
"""

from __future__ import annotations

from pathlib import Path

import torch

from weightsync_operator.demo.vllm_server import KV_BLOCK

VOCAB = 1024


def config(tie_word_embeddings: bool = False):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=tie_word_embeddings, torch_dtype="float32",
                       bos_token_id=1, eos_token_id=2,
                       # Wider than HF's default 0.02: logits then have clear winners, so greedy
                       # decoding never hinges on a near-tie that two engines' float32 rounding
                       # could break differently.
                       initializer_range=0.1)


def build(directory: str | Path, seed: int = 0, tie_word_embeddings: bool = False) -> Path:
    """Randomly initialise the model with `seed` and save it (safetensors + config) in `directory`."""
    from transformers import Qwen2ForCausalLM

    directory = Path(directory)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config(tie_word_embeddings)).to(torch.float32)
    model.save_pretrained(directory)
    return directory


def load(directory: str | Path):
    """The saved model in HF transformers, float32, in eval mode (the trainer's copy)."""
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()


def prompts() -> list[list[int]]:
    """Fixed prompts as token ids: two short ones and one longer than two of the server's KV
    blocks, so a prefix-cache block left over from the previous weights would be reused, and
    show, if an update did not clear the cache."""
    generator = torch.Generator().manual_seed(7)
    lengths = [5, 9, KV_BLOCK * 2 + 3]
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


@torch.no_grad()
def greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """HF greedy continuation of `prompt`, `max_tokens` long, as vLLM's `ignore_eos` decodes:
    EOS may be chosen, it just does not stop decoding. (`generate(min_new_tokens=...)` would
    not do: it forbids EOS, so the two would part wherever EOS wins.)"""
    ids = torch.tensor([prompt])
    out: list[int] = []
    past = None
    for _ in range(max_tokens):
        step = model(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
        past = step.past_key_values
        token = int(step.logits[0, -1].argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def train_step(model, lr: float = 0.5) -> float:
    """One real optimisation step of next-token prediction on one fixed, seeded text (the model
    learns it by heart, so the loss falls round after round). The learning rate is large enough
    that every step changes the greedy completions, so a round that did not land would show."""
    generator = torch.Generator().manual_seed(10_000)
    tokens = torch.randint(3, VOCAB, (4, 24), generator=generator)
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter.add_(parameter.grad, alpha=-lr)
    model.eval()
    return float(loss.detach())
