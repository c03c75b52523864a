"""Every relative link in README.md and docs/ resolves: the file or folder exists, and an anchor
(``#section``) names a heading of the target Markdown file, spelt as GitHub spells it. Pruning
docs/bench/ or renaming a section of docs/results.md must not leave a dead link behind."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
                    *(ROOT / "docs").glob("*/README.md")])
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = ("http://", "https://", "mailto:")


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeats."""
    found: set[str] = set()
    repeats: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", markdown.read_text())):
        slug = github_anchor(heading)
        count = repeats.get(slug, 0)
        repeats[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def dead_links(document: Path) -> list[str]:
    """The relative links of one document that do not resolve, as 'target (why)'."""
    dead = []
    for target in LINK.findall(_prose(document.read_text())):
        if target.startswith(EXTERNAL):
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (document.parent / path_part).resolve() if path_part else document
        if not resolved.exists():
            dead.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            dead.append(f"{target} (no heading with that anchor)")
    return dead


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document: Path) -> None:
    assert dead_links(document) == []


def test_anchor_spelling_follows_github() -> None:
    assert github_anchor("Table 1 under the paper's initialisation, one seed") == (
        "table-1-under-the-papers-initialisation-one-seed")
    assert github_anchor("Long context (issue 26): not yet measured") == (
        "long-context-issue-26-not-yet-measured")


def test_a_dead_link_is_reported(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#a-heading) [gone](bench/removed/results.md) "
                    "[bad anchor](there.md#no-such) `[code](not/a/link)`\n")
    assert dead_links(page) == ["bench/removed/results.md (no such file)",
                                "there.md#no-such (no heading with that anchor)"]
