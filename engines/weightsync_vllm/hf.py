"""`CheckpointSource` moved to the core (`weightsync.hf`), shared by the vLLM and SGLang backends'
trainers; kept importable here for the trainers written against it."""

from __future__ import annotations

from weightsync.hf import CheckpointSource

__all__ = ["CheckpointSource"]
