"""The code blocks of the README and the docs pages, with the annotation that says how each is
tested (tests/project/test_readme.py checks them; other tests run the blocks they cover)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# Every page the README links; each is checked like the README. A new page joins by being linked.
PAGES = (README, *sorted(DOCS.glob("*.md")))

FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")
ANNOTATION = re.compile(r"^<!--\s*snippet:\s*(\S+)\s*(.*?)\s*-->$")
KINDS = ("run", "helm-render", "covered", "skip")


@dataclass(frozen=True)
class Snippet:
    page: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    kind: str | None  # from the annotation; None when there is none
    argument: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}:{self.language or 'text'}"

    @property
    def how(self) -> str:
        return self.kind or ("run" if self.language == "python" else "unannotated")


def snippets(text: str, page: str = "README.md") -> list[Snippet]:
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, language = opening.group(1), opening.group(2).lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(fence)), None)
        assert end is not None, f"{page}:{i + 1}: a code block that never closes"
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        annotation = ANNOTATION.match(before)
        kind, argument = (annotation.group(1), annotation.group(2)) if annotation else (None, "")
        found.append(Snippet(page, i + 1, language, "\n".join(lines[i + 1:end]) + "\n", kind, argument))
        i = end + 1
    return found


def page_snippets(path: Path) -> list[Snippet]:
    return snippets(path.read_text(), str(path.relative_to(ROOT)))
