"""A checkpoint a documented serve command can start on without the hub: the vLLM tests' tiny
Qwen2 (tests/helpers/vllm_trainer.py's build_model) plus a small byte-level BPE tokenizer, since
a command as a user runs it has no `--skip-tokenizer-init`. Run with the vLLM venv's python:

    python tests/helpers/tiny_checkpoint.py DIR [--max-positions N]

transformers takes the qwen2 model type's tokenizer class for the files it finds; a byte-level
BPE is what that class reads (a WordLevel model would encode every text to nothing).
"""

from __future__ import annotations

import argparse

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vllm_trainer import build_model  # this directory

CORPUS = ["the quick brown fox jumps over the lazy dog", "weights move from the trainer to vLLM",
          "a round is start, update and finish"]


def tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 50, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--max-positions", type=int, default=256)
    args = parser.parse_args()
    model = build_model(tied=False, seed=0, max_positions=args.max_positions)
    model.save_pretrained(args.directory, safe_serialization=True)
    tokenizer(model.config.vocab_size).save_pretrained(args.directory)


if __name__ == "__main__":
    main()
