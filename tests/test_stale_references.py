"""Issue 11 defect 9: references to files that do not exist in the repository.

Every ``scripts/*.py`` and ``tests/*.py`` path named in the package, the scripts, the docs
or the README exists (result files under ``docs/`` are left out: a doc may give the command
that writes one before it is committed), and nothing cites the project notes kept outside
the repository (METHOD.md, STYLE.md)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "README.md", *sorted((ROOT / "lowbit_tp").rglob("*.py")), *sorted((ROOT / "scripts").glob("*.py")),
           *sorted((ROOT / "docs").rglob("*.md"))]
PATH = re.compile(r"(?<![\w./-])((?:scripts|tests)/[\w./-]*\w\.(?:py|sh))")


def test_cited_repository_paths_exist():
    missing = []
    for src in SOURCES:
        for m in PATH.finditer(src.read_text(errors="replace")):
            if not (ROOT / m.group(1)).exists():
                missing.append(f"{src.relative_to(ROOT)}: {m.group(1)}")
    assert not missing, missing


def test_no_citation_of_notes_outside_the_repository():
    cited = [str(src.relative_to(ROOT)) for src in SOURCES + sorted((ROOT / "tests").glob("*.py"))
             if src.name != "test_stale_references.py" and re.search(r"\b(METHOD|STYLE)\.md\b", src.read_text())]
    assert not cited, cited


# Names a README snippet may leave to the reader (the prose around it says what they are).
SNIPPET_PLACEHOLDERS = {"path", "model", "world", "config"}


def test_readme_python_snippets_define_what_they_use():
    import ast
    import builtins

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks
    undefined = []
    for i, code in enumerate(blocks):
        tree = ast.parse(code)
        bound = {a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                 for a in n.names}
        bound |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        undefined += [f"snippet {i + 1}: {name}" for name in sorted(used - bound - SNIPPET_PLACEHOLDERS)
                      if not hasattr(builtins, name)]
    assert not undefined, undefined
