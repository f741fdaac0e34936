"""The README and docs/ stay navigable: every relative link resolves, every page is reachable (issue 20).

Issue 20 moved the benchmark report, performance tables and merge details out of a 1,039-line README
into docs/; these tests keep the README short and stop a moved or renamed page from leaving dead links.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 260

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+).+?\1")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    """The text without code blocks and code spans, where brackets are not links."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links(page: Path) -> list[str]:
    """Every relative link target of a Markdown page (web and mail links left out)."""
    targets = _LINK.findall(_prose(page.read_text()))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings (a repeated heading gets -1, -2, ...)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in _HEADING.findall(_FENCE.sub("", page.read_text())):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


def broken(page: Path, target: str) -> str | None:
    """Why ``target`` (as written in ``page``) does not resolve, or None when it does."""
    path_part, _, anchor = target.partition("#")
    dest = (page.parent / path_part).resolve() if path_part else page
    if not dest.exists():
        return f"{page.name}: link {target!r}: {dest} does not exist"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{page.name}: link {target!r}: no heading #{anchor} in {dest.name}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    problems = [why for target in links(page) if (why := broken(page, target))]
    assert problems == []


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(REPO / t.partition("#")[0]).resolve() for t in links(README) if t.partition("#")[0]}
    orphans = [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked]
    assert orphans == []


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_docs_pages_open_with_a_title_and_one_line_on_what_they_hold(page: Path) -> None:
    title, blank, summary = page.read_text().split("\n")[:3]
    assert title.startswith("# ") and blank == "" and summary and not summary.startswith(("#", "|", "`"))


def test_readme_stays_short_and_keeps_its_sections_in_order() -> None:
    """Issue 20: the README is for users (about 250 lines); evidence lives in docs/."""
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    order = ["make app", "make test", "## What it does", "## Command line", "## Supported formats",
             "## How a recommendation is made", "## Limitations", "## File map", "## Tests"]
    positions = [text.index(marker) for marker in order]
    assert positions == sorted(positions)
    assert "(docs/screenshot.png)" in text[: text.index("make app")]


def test_the_link_checker_catches_what_it_should(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n## A `code` heading: yes?\n\n## Top\n\n"
                    "[ok](#top) [ok](#a-code-heading-yes) [ok](#top-1) [web](https://x.y/z) [ok](page.md#top)\n"
                    "[gone](missing.md) [bad](#nowhere) `[not a link](nope.md)`\n```\n[also not](nope.md)\n```\n")
    problems = [why for target in links(page) if (why := broken(page, target))]
    assert len(problems) == 2
    assert "'missing.md'" in problems[0] and "does not exist" in problems[0]
    assert "no heading #nowhere" in problems[1]
