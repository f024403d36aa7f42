"""Every relative markdown link in README.md and docs/ points at a file that exists, and
every ``#anchor`` into a markdown page names one of its headings (GitHub's slug rule).

The README's long measurement sections moved to docs/ pages, whose links had to be
rewritten relative to docs/; this catches a link left pointing at the old place."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1", re.S | re.M)


def _slug(heading: str) -> str:
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def broken_links(pages=PAGES, root=ROOT) -> list[str]:
    broken = []
    for page in pages:
        for m in LINK.finditer(FENCE.sub("", page.read_text())):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(root)}: {target}"
            if not dest.exists():
                broken.append(where)
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(where + " (no such heading)")
    return broken


def test_relative_links_resolve():
    broken = broken_links()
    assert not broken, broken


def test_the_check_sees_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Top\n\n## Two `words`, here\n")
    page = tmp_path / "docs" / "b.md"
    page.write_text("[ok](a.md#two-words-here) ![img](a.md) [web](https://example.org/x) [up](../docs/a.md) "
                    "[gone](bench/x.md) [old](docs/a.md) [anchor](a.md#three)\n```\n[code](nowhere.md)\n```\n")
    found = [b.split(": ", 1)[1] for b in broken_links([page], root=tmp_path)]
    assert found == ["bench/x.md", "docs/a.md", "a.md#three (no such heading)"]
