"""The daemon's command-line argument types that need torch or the protocol's models.

The torch-free types every `weightsync` command shares are in `weightsync.cli_args`; these two
check a device and a manifest file while argparse parses, so that a bad one reads as one line
naming it (exit status 2), as every other bad argument does.
"""

from __future__ import annotations

import argparse
import json

import pydantic
import torch

from weightsync.cli_args import first_problem, readable_text
from weightsync.protocol import Manifest


def device(text: str) -> str:
    """A torch device string ('cpu', 'cuda', 'cuda:0')."""
    try:
        torch.device(text)
    except (RuntimeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device ({error})") from None
    return text


def manifest_file(text: str) -> Manifest:
    """A JSON manifest (see `weightsync daemon --help`), parsed and validated."""
    _, content = readable_text(text, "manifest")
    try:
        return Manifest.model_validate(json.loads(content))
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"manifest {text} is not JSON ({error})") from None
    except pydantic.ValidationError as error:
        raise argparse.ArgumentTypeError(f"manifest {text}: {first_problem(error)}") from None
