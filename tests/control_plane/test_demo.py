"""The README's first command, `weightsync demo`, end to end as a user runs it."""

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # the demo: daemon processes and a trainer


def test_demo_verifies_every_round():
    run = subprocess.run([sys.executable, "-m", "weightsync_cli", "demo", "--rounds", "3", "--daemons", "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)\s+yes$", run.stdout, re.M)
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert all(int(r[2].replace(",", "")) > 1_000_000 for r in rows)
    assert "3/3 rounds verified bit-exact across 2 daemons" in run.stdout
