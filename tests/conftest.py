"""Fixtures shared by every folder: real local daemon processes, a free rendezvous port, the vLLM
venv's python; and the marks that place a test in its lane. Each folder holds one layer's tests
(core, daemon, engines, control_plane, chart, project); what several tests share that is not a
fixture lives in tests/helpers (on the path: pyproject's pytest `pythonpath`)."""

from __future__ import annotations

import os

import httpx
import pytest
import pytest_asyncio
import torch

from weightsync_operator.local import free_port


# Fixtures that start party processes or a rendezvous (a gloo group, a TCP store): a test using
# any of them is an integration test, outside the fast lane (`make test-fast`), marked here so
# that a new test is placed by what it uses. Tests that start processes or servers otherwise
# carry `pytest.mark.integration` themselves.
INTEGRATION_FIXTURES = {"spawn", "module_spawn", "rendezvous_port"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the marks added here count
def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The vLLM venv's python (helpers/vllm_server.py): the tests that need it skip without it,
    except under CI, where they fail."""
    from helpers.vllm_server import VLLM_PYTHON, vllm_python_problem

    problem = vllm_python_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the vLLM tests: {problem}")
        pytest.skip(problem)
    return VLLM_PYTHON


@pytest.fixture(scope="session")
def sglang_python() -> str:
    """The SGLang venv's python (helpers/sglang_server.py): the tests that need it skip without
    it, except under CI, where they fail."""
    from helpers.sglang_server import SGLANG_PYTHON, sglang_python_problem

    problem = sglang_python_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SGLang tests: {problem}")
        pytest.skip(problem)
    return SGLANG_PYTHON


@pytest.fixture(scope="module")
def rendezvous_port() -> int:
    return free_port()


async def _spawner():
    from weightsync_operator.local import LocalProcess, stop_all

    started: list[LocalProcess] = []

    async def _spawn(name: str, *args: str, module: str = "weightsync_daemon", env: dict | None = None):
        argv = list(args) or ["--port", "0", "--backend", "cpu"]
        # Gone with the test run even if it dies without stopping them (it closes their stdin).
        argv.append("--exit-on-stdin-eof")
        process = await LocalProcess.start(name, module, argv, timeout=90, env=env)
        started.append(process)
        return process

    yield _spawn
    await stop_all(started)


@pytest_asyncio.fixture
async def spawn():
    """Start real local party processes (standalone daemons by default); stopped afterwards."""
    async for spawner in _spawner():
        yield spawner


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_spawn():
    """`spawn` for processes shared by a whole test module (its tests use loop_scope="module")."""
    async for spawner in _spawner():
        yield spawner


@pytest_asyncio.fixture
async def http():
    async with httpx.AsyncClient(timeout=60) as client:
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_http():
    async with httpx.AsyncClient(timeout=60) as client:
        yield client
