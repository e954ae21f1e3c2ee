"""Every ``docs/<page>.md#<section>`` cited in the code, the tests, the benchmarks and the
markdown files names a page that exists and a section heading of it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+))?")
SOURCES = [
    *ROOT.glob("zipvl/**/*.py"),
    *ROOT.glob("tests/**/*.py"),
    *ROOT.glob("bench/*.py"),
    *ROOT.glob("*.md"),
    *ROOT.glob("docs/*.md"),
]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {
        _slug(line.lstrip("#"))
        for line in page.read_text().splitlines()
        if re.match(r"#{1,6} ", line)
    }


def _citations() -> list[tuple[Path, str, str | None]]:
    found = []
    for path in SOURCES:
        text = path.read_text()
        if path.parent.name == "docs":  # links between pages: page.md#section
            text = re.sub(r"\]\(([\w-]+\.md)", r"](docs/\1", text)
        for match in CITATION.finditer(text):
            found.append((path, match.group(1), match.group(2)))
    return found


def test_slug_matches_github() -> None:
    assert _slug("Model facts used by the benchmarks") == "model-facts-used-by-the-benchmarks"
    assert _slug("tau times total") == "tau-times-total"
    assert _slug("Budget (Eq. 6)") == "budget-eq-6"


def test_every_docs_citation_resolves() -> None:
    citations = _citations()
    assert len(citations) >= 10  # the code cites the docs
    pages = {p.name: _anchors(p) for p in (ROOT / "docs").glob("*.md")}
    assert {"algorithm.md", "design.md", "decisions.md"} <= set(pages)
    for path, page, anchor in citations:
        where = path.relative_to(ROOT)
        assert page in pages, f"{where}: docs/{page} does not exist"
        if anchor is not None:
            assert anchor in pages[page], f"{where}: docs/{page} has no section #{anchor}"
