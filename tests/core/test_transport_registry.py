"""The transport registry tells the truth: built-ins in one table, a broken import named."""

from __future__ import annotations

import sys

import pytest

from weightsync import transports
from weightsync.transports import BUILTINS, Transport, available, get_transport, register


def test_every_built_in_loads_from_its_one_entry():
    for name in BUILTINS:
        cls = get_transport(name)
        assert issubclass(cls, Transport) and cls.name == name
    assert set(BUILTINS) <= set(available())


def test_a_built_in_that_fails_to_import_says_why(monkeypatch):
    monkeypatch.delitem(transports._REGISTRY, "nccl", raising=False)
    monkeypatch.setitem(sys.modules, "weightsync.transports.nccl", None)  # as a broken import
    with pytest.raises(ValueError, match="the nccl backend could not be loaded: ModuleNotFoundError") as raised:
        get_transport("nccl")
    assert isinstance(raised.value.__cause__, ImportError)


def test_an_unknown_name_lists_what_is_there_and_built_in_names_are_taken():
    with pytest.raises(ValueError, match=r"unknown backend 'rdma'; available: \['cpu'"):
        get_transport("rdma")

    class Impostor(Transport):
        name = "cpu"

    with pytest.raises(ValueError, match="built-in"):
        register(Impostor)
