"""The docs stand alone: every relative link in the README and docs/ points at a file in the
repository (and at a heading that exists, for #anchors), and nothing points outside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors: headings lowercased, punctuation dropped, spaces as hyphens."""
    headings = [
        line.lstrip("#").strip() for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("#")
    ]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_links_resolve_inside_the_repository(page: Path) -> None:
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to {target} names no file"
        assert file.is_relative_to(REPO), f"{page.name}: link to {target} leaves the repository"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file), f"{page.name}: no heading for #{anchor} in {file.name}"


def test_the_readme_is_short_and_starts_with_the_two_commands() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 150
    assert text.splitlines()[2:6] == [
        "```bash",
        "make demo    # installs qualgate (CPU torch, all extras) and runs `qualgate run` on the bundled demo",
        "make test    # runs the test suite on every core (python -m pytest -q -n auto)",
        "```",
    ]
