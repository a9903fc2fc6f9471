"""tools/function_sizes.py, the function-size step of `make lint`: its complexity is ruff's C901
measure (so the two never disagree), and it fails on a function over either limit."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tools import function_sizes

ROOT = Path(__file__).resolve().parents[2]

RUFF = Path(sys.executable).with_name("ruff")


@pytest.mark.skipif(not RUFF.exists(), reason="ruff is installed by the dev extra")
def test_its_complexity_is_ruffs_c901_for_every_function_of_the_project(monkeypatch):
    monkeypatch.chdir(ROOT)
    paths = list(function_sizes.DEFAULT_PATHS)
    out = subprocess.run([str(RUFF), "check", "--select", "C901", "--config", "lint.mccabe.max-complexity=0",
                          "--output-format", "concise", "--no-cache", *paths],
                         cwd=ROOT, capture_output=True, text=True).stdout
    ruff = {}
    for line in out.splitlines():
        if " C901 " in line:
            where, _, rest = line.partition(": C901 ")
            path, row = where.split(":")[:2]
            ruff[(path, int(row))] = int(rest.rsplit("(", 1)[1].split(" ")[0])
    ours = {(m.path, m.line): m.complexity
            for f in function_sizes.python_files(paths)
            for m in function_sizes.measure_source(f.read_text(encoding="utf-8"), f.as_posix())}
    assert len(ours) > 500 and ours == ruff


def test_it_fails_on_a_function_too_complex_or_too_long(tmp_path, capsys):
    branches = "\n".join(f"    if x == {i}:\n        return {i}" for i in range(16))
    long_body = "\n".join(f"    y = {i}" for i in range(60))
    (tmp_path / "m.py").write_text(f"def branchy(x):\n{branches}\n\n\ndef long():\n{long_body}\n")
    assert function_sizes.main([str(tmp_path)]) == 1
    printed = capsys.readouterr().out
    assert "complexity  17" in printed and "branchy" in printed and "61 lines" in printed and "long" in printed
    (tmp_path / "m.py").write_text(textwrap.dedent("""\
        def fine(x):
            return [i for i in range(x) if i and x or not i]
        """))
    assert function_sizes.main([str(tmp_path)]) == 0
