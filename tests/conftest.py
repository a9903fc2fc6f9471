"""Shared fixtures: real local daemon processes and a free rendezvous port."""

from __future__ import annotations

import pytest
import torch

from weightsync_operator.local import free_port


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rendezvous_port() -> int:
    return free_port()
