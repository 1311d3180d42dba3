"""The project speaks of itself as it is now: no diary headings or issue numbers anywhere,
a README a newcomer reads in one sitting, and a site whose pages are all reachable."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DIARY = re.compile(r"\b(session|sessions|issue|issues)\s+#?\d+", re.IGNORECASE)
CHECKED = ("rnnkit", "docs", "bench", "configs", "tests", "data", ".ci")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".html", ".txt", ""}


OUTPUTS = ROOT / "bench" / "out"


def _files():
    for top in CHECKED:
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts \
                    and OUTPUTS not in path.parents:      # benchmark outputs (ignored by git) are not the project's
                yield path
    yield from (ROOT / name for name in ("README.md", "Makefile", "pyproject.toml", "mkdocs.yml"))


def test_no_session_or_issue_numbers_anywhere():
    found = []
    for path in _files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if DIARY.search(line) and path != Path(__file__):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not found, "say what holds now, not when it happened:\n" + "\n".join(found)


@pytest.mark.parametrize("word, spaced", [("Session", " "), ("issue", " "), ("Issue", " #"), ("sessions", " ")])
def test_the_pattern_finds_what_it_is_for(word, spaced):
    assert DIARY.search(f"### {word}{spaced}{11}: something") and not DIARY.search(f"a {word.lower()} of training")


def test_readme_is_short_and_points_into_the_site():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    assert "make quickstart" in readme and "make test" in readme
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link


def test_every_docs_page_is_in_the_nav():
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = yaml.load(text, Loader=_MkdocsLoader)["nav"]

    def pages(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from pages(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from pages(value)

    listed = set(pages(nav))
    written = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    generated = {"reference/config.md", "reference/cli.md"}
    assert written | generated == listed


class _MkdocsLoader(yaml.SafeLoader):
    """mkdocs.yml names a Python function with a !!python/name tag; read it as text."""


_MkdocsLoader.add_multi_constructor("tag:yaml.org,2002:python/name:", lambda loader, suffix, node: suffix)
