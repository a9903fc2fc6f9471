"""A small but real transformer language model for the demo: embeddings, attention, MLP, head."""

from __future__ import annotations

import torch
from torch import nn


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 512, width: int = 128, layers: int = 4, heads: int = 4,
                 context: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        hidden = self.embed(tokens) + self.position[:length]
        return self.head(self.norm(self.blocks(hidden, mask=mask, is_causal=True)))


def build_model(seed: int) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer().eval()


def probe_tokens(batch: int = 4, length: int = 32, vocab: int = 512) -> torch.Tensor:
    """The fixed input every party runs, so outputs can be compared bit for bit."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def train_step(model: TinyTransformer, step: int, lr: float = 1e-3) -> float:
    """One real optimisation step of next-token prediction on seeded random text."""
    generator = torch.Generator().manual_seed(10_000 + step)
    tokens = torch.randint(0, model.head.out_features, (8, 33), generator=generator)
    tokens = tokens.to(model.head.weight.device)
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:  # every parameter takes part in the loss
                p.add_(p.grad, alpha=-lr)
    model.eval()
    return float(loss.detach())
