"""The function-size gate of `make lint`: no function more complex than 15 or longer than 60 lines.

    python tools/function_sizes.py [PATH ...]   (default: the packages, the benchmarks and tools/)

Prints the ten most complex functions, then every function over either limit, and exits 1 if
there is one. Complexity is McCabe's, counted as ruff's C901 counts it (1, plus 1 per if/elif,
for, while, except, match case, a try's else, and per nested function with its own branches;
boolean operators and comprehensions add nothing), so this gate and `ruff check` agree. A
function's length is its lines from the `def` (its decorators excluded) to its last line,
docstring and comments included; nested functions count in the function that holds them and are
also measured on their own.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MAX_COMPLEXITY = 15
MAX_LINES = 60
DEFAULT_PATHS = (
    "weightsync",
    "engines/weightsync_vllm",
    "daemon/weightsync_daemon",
    "operator/weightsync_operator",
    "cli/weightsync_cli",
    "benchmarks",
    "tools",
)

_Function = ast.FunctionDef | ast.AsyncFunctionDef


@dataclass(frozen=True)
class Measured:
    path: str
    line: int
    name: str
    complexity: int
    lines: int

    def where(self) -> str:
        return f"{self.path}:{self.line} {self.name}"


def _branches(body: list[ast.stmt]) -> int:
    """The decision points of a block, as ruff's mccabe (C901) counts them."""
    n = 0
    for stmt in body:
        if isinstance(stmt, ast.If):
            n += 1 + _branches(stmt.body)
            # An `elif` is an If alone in the orelse; a plain `else` adds no decision.
            n += _branches(stmt.orelse)
        elif isinstance(stmt, (ast.For, ast.AsyncFor, ast.While)):
            n += 1 + _branches(stmt.body) + _branches(stmt.orelse)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            n += _branches(stmt.body)
        elif isinstance(stmt, ast.Match):
            for case in stmt.cases:
                n += 1 + _branches(case.body)
        elif isinstance(stmt, (ast.Try, ast.TryStar)):
            n += _branches(stmt.body) + _branches(stmt.finalbody)
            if stmt.orelse:
                n += 1 + _branches(stmt.orelse)
            for handler in stmt.handlers:
                n += 1 + _branches(handler.body)
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n += 1 + _branches(stmt.body)
        elif isinstance(stmt, ast.ClassDef):
            n += _branches(stmt.body)
    return n


def complexity(fn: _Function) -> int:
    return 1 + _branches(fn.body)


def measure_source(source: str, path: str) -> list[Measured]:
    tree = ast.parse(source, filename=path)
    found: list[Measured] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                end = child.end_lineno if child.end_lineno is not None else child.lineno
                found.append(Measured(path, child.lineno, name, complexity(child), end - child.lineno + 1))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def python_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*.py") if "__pycache__" not in f.parts))
        elif p.suffix == ".py":
            files.append(p)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("paths", nargs="*", default=list(DEFAULT_PATHS))
    parser.add_argument("--top", type=int, default=10, help="how many of the most complex functions to print")
    args = parser.parse_args(argv)

    measured: list[Measured] = []
    for f in python_files(args.paths):
        measured.extend(measure_source(f.read_text(encoding="utf-8"), f.as_posix()))

    print(f"The {args.top} most complex functions (McCabe, as ruff's C901; limit {MAX_COMPLEXITY}):")
    for m in sorted(measured, key=lambda m: (-m.complexity, m.where()))[: args.top]:
        print(f"  {m.complexity:4d}  {m.lines:4d} lines  {m.where()}")

    too_complex = [m for m in measured if m.complexity > MAX_COMPLEXITY]
    too_long = [m for m in measured if m.lines > MAX_LINES]
    worst_first: list[tuple[str, list[Measured], Callable[[Measured], int]]] = [
        (f"more complex than {MAX_COMPLEXITY}", too_complex, lambda m: -m.complexity),
        (f"longer than {MAX_LINES} lines", too_long, lambda m: -m.lines),
    ]
    for title, items, key in worst_first:
        if items:
            print(f"\n{len(items)} function(s) {title}:")
            for m in sorted(items, key=lambda m: (key(m), m.where())):
                print(f"  complexity {m.complexity:3d}  {m.lines:4d} lines  {m.where()}")
    failed = {m.where() for m in too_complex + too_long}
    if failed:
        print(f"\nfunction sizes: {len(failed)} function(s) over the limits "
              f"(complexity {MAX_COMPLEXITY}, {MAX_LINES} lines)")
        return 1
    print(f"\nfunction sizes: {len(measured)} functions, none over complexity {MAX_COMPLEXITY} or {MAX_LINES} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
