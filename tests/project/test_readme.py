"""Every fenced code block in README.md and in docs/*.md is a test: run as written, or tied to
what tests it. The README is the front page: it links every page under docs/ and stays short.

Convention for README and docs authors. The line right before a block's opening fence (blank lines
between are allowed) may be an HTML comment, invisible on GitHub, that says how the block is
tested:

    <!-- snippet: run -->
        run the block as written: a python block with this interpreter in a subprocess, a sh block
        with bash -euo pipefail; from the repository root, with a timeout. Python blocks need no
        annotation: they run by default.
    <!-- snippet: helm-render -->
        a block of `helm install/upgrade ./charts/weightsync ... --set k=v` commands: each command's
        values are rendered by Helm's own engine and every manifest validated (tests/chart/test_chart.py's
        render), since there is no cluster to install into.
    <!-- snippet: covered tests/LAYER/test_x.py::test_name [why] -->
        a test elsewhere runs what this block shows (it must exist); e.g. the kubectl flow runs
        against the emulated API server in tests/control_plane/test_operator_kubectl.py.
    <!-- snippet: skip <reason> -->
        not runnable by its nature (a diagram, sample output, GPU-only numbers); the reason is required.

A block that is not python and has no annotation fails this test: whoever adds a section (e.g.
"With vLLM") decides, by name, how its blocks are tested.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.snippets import DOCS, KINDS, PAGES, README, ROOT, Snippet, page_snippets

# The front page: what a newcomer needs in five minutes; the manual lives in docs/.
README_MAX_LINES = 250
TIMEOUT_SECONDS = 180

SNIPPETS = [s for path in PAGES for s in page_snippets(path)]


def run(argv: list[str], what: Snippet) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as timeout:
        raise AssertionError(f"{what.id} still ran after {TIMEOUT_SECONDS}s: {timeout.stderr}") from None
    assert done.returncode == 0, f"{what.id} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def helm_values(command: str) -> dict:
    """The values `--set a.b=c` pairs give, typed as Helm's --set types them."""
    values: dict = {}
    words = shlex.split(command)
    for flag, pair in zip(words, words[1:], strict=False):
        if flag != "--set":
            continue
        path, _, raw = pair.partition("=")
        value: object = {"true": True, "false": False}.get(raw, raw)
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
            value = int(value)
        node = values
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return values


def test_the_readme_is_a_front_page_linking_every_docs_page():
    text = README.read_text()
    lines = len(text.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it a front page, move the rest to docs/"
    sections = re.findall(r"^## (.+)$", text, re.M)
    for needed in ("Quick start", "Install", "Using the library", "With vLLM", "On Kubernetes", "Documentation"):
        assert needed in sections, f"README.md has no section {needed!r} (it has {sections})"
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make demo " in quick_start and "make test " in quick_start, "the quick start's two commands"
    for page in ("vllm", "kubernetes", "http-api", "operations", "performance"):
        assert (DOCS / f"{page}.md").is_file(), f"docs/{page}.md is missing"
    unlinked = [p.name for p in PAGES[1:] if f"](docs/{p.name})" not in text]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_every_relative_link_of_the_pages_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to nothing: {broken}"


def test_the_pages_have_the_blocks_this_test_knows_how_to_check():
    assert len(SNIPPETS) >= 30
    unknown = [f"{s.id}: snippet kind {s.kind!r}" for s in SNIPPETS if s.kind is not None and s.kind not in KINDS]
    assert not unknown, f"{unknown}; use one of {KINDS}"
    unannotated = [s.id for s in SNIPPETS if s.how == "unannotated"]
    assert not unannotated, (f"{unannotated}: say how each block is tested, with <!-- snippet: run | helm-render | "
                             "covered tests/LAYER/FILE.py::TEST | skip REASON --> on the line before it "
                             "(see this file)")
    # The library section is complete: it shows both sides of a round, and runs.
    library = README.read_text().split("## Using the library", 1)[1].split("\n## ", 1)[0]
    (block,) = [s for s in SNIPPETS if s.language == "python" and s.code in library]
    assert block.how == "run" and "WeightSender" in block.code and "serve_embedded" in block.code


@pytest.mark.integration  # each snippet runs as a process (some serve HTTP)
@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.how == "run"], ids=lambda s: s.id)
def test_runs_as_written(snippet, tmp_path):
    if snippet.language == "python":
        script = tmp_path / "snippet.py"
        script.write_text(snippet.code)
        run([sys.executable, str(script)], snippet)
    elif snippet.language in ("sh", "bash", "shell", "console"):
        run(["bash", "-euo", "pipefail", "-c", snippet.code], snippet)
    else:
        pytest.fail(f"{snippet.id}: cannot run a {snippet.language or 'text'} block; annotate it otherwise")


@pytest.mark.chart
@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.how == "helm-render"], ids=lambda s: s.id)
def test_helm_commands_render_and_validate(snippet):
    from helpers.chart import render, validate_all

    commands = [c for c in snippet.code.replace("\\\n", " ").splitlines() if c.strip().startswith("helm ")]
    assert commands, f"{snippet.id} has no helm command"
    for command in commands:
        words = shlex.split(command)
        assert words[1] in ("install", "upgrade") and "./charts/weightsync" in words, command
        docs = render(helm_values(command))
        validate_all(docs)


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.how == "covered"], ids=lambda s: s.id)
def test_the_covering_test_exists(snippet):
    target = snippet.argument.split()[0] if snippet.argument else ""
    path, _, name = target.partition("::")
    assert path and name, f"{snippet.id}: write `covered tests/LAYER/FILE.py::TEST_NAME`"
    source = ROOT / path
    assert source.is_file(), f"{snippet.id}: {path} does not exist"
    assert re.search(rf"^(async )?def {re.escape(name)}\(", source.read_text(), re.M), \
        f"{snippet.id}: {path} has no test {name}"


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.how == "skip"], ids=lambda s: s.id)
def test_a_skipped_block_says_why(snippet):
    assert len(snippet.argument) >= 10, f"{snippet.id}: `skip` needs a reason"
