"""Issue 13 item 8, first contact: the `weightsync` commands as a new user meets them.

A bad argument reads as one line naming it, exit status 2, never a traceback; `weightsync daemon
--help` shows every default and the `--manifest` format, with an example that parses; an embedded
receiver warns about a missing token exactly as the standalone daemon does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from weightsync.protocol import Manifest
from weightsync.tokens import TOKEN_ENV
from weightsync_daemon import ReceiverService, arg_types

pytestmark = pytest.mark.integration  # runs the CLI as a process, and embedded servers
WEIGHTSYNC = str(Path(sys.executable).parent / "weightsync")


def weightsync(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    import os

    environment = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, "KUBECONFIG")}
    return subprocess.run([WEIGHTSYNC, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**environment, **(env or {})})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    made = {"empty": root / "empty", "blank": root / "blank", "token": root / "token",
            "not-json": root / "not-json", "bad-dtype": root / "bad-dtype.json"}
    made["empty"].write_text("")
    made["blank"].write_text("  \n\t\n")
    made["token"].write_text("a-token\n")
    made["not-json"].write_text("{tensors: [")
    made["bad-dtype"].write_text(json.dumps({"tensors": [{"name": "w", "dtype": "float33", "shape": [2]}]}))
    return {k: str(v) for k, v in made.items()} | {"missing": str(root / "missing"), "dir": str(root)}


BAD = [  # (argv with {file} placeholders, what the one line must name)
    (["daemon", "--token-file", "{empty}"], "--token-file.*is empty"),
    (["daemon", "--token-file", "{blank}"], "--token-file.*is empty"),
    (["daemon", "--token-file", "{missing}"], "--token-file.*does not exist"),
    (["daemon", "--token-file", "{dir}"], "--token-file.*is a directory"),
    (["daemon", "--port", "99999"], "--port.*outside 0-65535"),
    (["daemon", "--port", "-1"], "--port.*outside 0-65535"),
    (["daemon", "--port", "http"], "--port.*not a port number"),
    (["daemon", "--manifest", "{missing}"], "--manifest.*does not exist"),
    (["daemon", "--manifest", "{not-json}"], "--manifest.*not JSON"),
    (["daemon", "--manifest", "{bad-dtype}"], "--manifest.*float33"),
    (["daemon", "--device", "gpu:zero"], "--device.*not a torch device"),
    (["daemon", "--backend", "rdma"], "--backend.*invalid choice"),
    (["daemon", "--log-level", "loud"], "--log-level"),
    (["daemon", "--shutdown-grace", "-3"], "--shutdown-grace"),
    (["daemon", "--cpu-threads", "0"], "--cpu-threads.*at least 1"),
    (["daemon", "--max-body-bytes", "0"], "--max-body-bytes.*more than 0"),
    (["daemon", "--body-timeout", "0"], "--body-timeout"),
    (["daemon", "--header-timeout", "soon"], "--header-timeout"),
    (["demo", "--daemons", "0"], "--daemons.*at least 1"),
    (["demo", "--rounds", "-2"], "--rounds.*at least 1"),
    (["demo", "--buffer-size", "7"], "--buffer-size.*multiple of 8"),
    (["demo", "--buffer-size", "64"], "--buffer-size.*greater than or equal"),
    (["demo", "--buffer-size", "lots"], "--buffer-size.*not a size"),
    (["demo", "--buffers", "0"], "--buffers"),
    (["operator", "--token-file", "{empty}"], "--token-file.*is empty"),
    (["operator", "--recheck-interval", "0"], "--recheck-interval"),
    (["operator", "--liveness", "localhost:8080"], "--liveness.*http://"),
    (["operator", "--priority", "high"], "--priority"),
    (["launch"], "invalid choice: 'launch'"),
]


@pytest.mark.parametrize("argv, names", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_argument_is_one_line_and_exit_2(files, argv, names):
    done = weightsync(*(a.format(**files) for a in argv))
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert re.search(rf"^weightsync( \w+)?: error: .*{names}", lines[0]), lines[0]
    assert done.stdout == ""


def test_a_port_in_use_ends_in_one_error_line_not_a_traceback():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = weightsync("daemon", "--host", "127.0.0.1", "--port", str(port), env={TOKEN_ENV: "a-token"})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"weightsync daemon: error: cannot serve on 127.0.0.1:{port}")


def test_the_operator_without_credentials_says_so_in_one_line(tmp_path):
    done = weightsync("operator", "--standalone", "--all-namespaces",
                      env={"KUBECONFIG": str(tmp_path / "no-kubeconfig")})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith("weightsync operator: error: no Kubernetes credentials")


def test_the_operator_runs_on_uvloop_which_its_extra_installs():
    """`weightsync operator` drives every WeightSync's control calls from one event loop; the
    `operator` extra brings uvloop and the command runs kopf on it."""
    from weightsync_operator.operator_cli import event_loop

    with event_loop() as loop:
        assert loop is not None, "uvloop is not installed with the operator extra"
        assert type(loop).__module__.startswith("uvloop"), type(loop)

        async def which() -> str:
            return type(asyncio.get_running_loop()).__module__

        assert loop.run_until_complete(which()).startswith("uvloop")


def test_daemon_help_shows_the_defaults_and_a_manifest_that_parses(tmp_path):
    done = weightsync("daemon", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for default in ("(default: 0.0.0.0)", "(default: 8200)", "(default: cpu)", "(default: warning)",
                    "(default: 20.0)"):
        assert default in text, default
    assert "--exit-on-stdin-eof" in text and "SIGTERM" in text
    # The documented example is a manifest the daemon accepts, as it would read it from a file.
    example = done.stdout[done.stdout.index('{"tensors"'):]
    example = example[:example.index("\n  ]}") + 5]
    (tmp_path / "manifest.json").write_text(example)
    manifest = arg_types.manifest_file(str(tmp_path / "manifest.json"))
    assert isinstance(manifest, Manifest) and len(manifest.tensors) == 3
    for dtype in ("bfloat16", "float32", "float8_e4m3fn"):
        assert dtype in done.stdout


def test_demo_help_shows_the_defaults():
    done = weightsync("demo", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for default in ("(default: 2)", "(default: 5)", "(default: auto)", "(default: 1MiB)"):
        assert default in text, default


def test_serve_embedded_warns_without_a_token_exactly_as_the_cli(caplog):
    from weightsync_daemon.server import serve_embedded

    # The standalone daemon's warning, as it logs it.
    process = subprocess.Popen([WEIGHTSYNC, "daemon", "--host", "127.0.0.1", "--port", "0"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={k: v for k, v in __import__("os").environ.items() if k != TOKEN_ENV})
    try:
        assert json.loads(process.stdout.readline())["url"]
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    (cli_warning,) = [line.split(" WARNING ", 1) for line in stderr.splitlines() if " WARNING " in line]
    assert cli_warning[0].endswith("weightsync.daemon")

    # The embedded receiver, without and with a token.
    with caplog.at_level(logging.WARNING, logger="weightsync.daemon"):
        server = serve_embedded(ReceiverService(), port=0)
        server.stop()
        warned = [r for r in caplog.records if r.name == "weightsync.daemon"]
        caplog.clear()
        guarded = serve_embedded(ReceiverService(), port=0, token="a-token")
        guarded.stop()
        silent = [r for r in caplog.records if r.name == "weightsync.daemon"]
    assert [(r.levelname, r.getMessage()) for r in warned] == [("WARNING", cli_warning[1])]
    assert silent == []
