"""Nothing in lowbit_tp/ patches another module at run time (a project rule: modules reach each other through explicit interfaces).

A static check over the package's source: no assignment to, deletion of, or ``setattr`` on
an attribute of an imported name (a module or anything taken from one), and no use of
``sys.modules`` to reach a module object. Timing and tracing go through explicit hooks
(:class:`lowbit_tp.tp.CommHooks`).
"""
import ast
from pathlib import Path

import lowbit_tp

ROOT = Path(lowbit_tp.__file__).parent


def _imported_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {a.asname or a.name for a in node.names}
    return names


def _base(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def patches_in(source: str) -> list[str]:
    tree = ast.parse(source)
    imported = _imported_names(tree)
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for t in targets:
            if isinstance(t, ast.Attribute) and _base(t) in imported:
                found.append(f"line {node.lineno}: assigns {ast.unparse(t)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            if node.args and _base(node.args[0]) in imported:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Attribute) and node.attr == "modules" and _base(node) == "sys":
            found.append(f"line {node.lineno}: uses sys.modules")
    return found


def test_the_check_catches_the_patterns_it_forbids():
    bad = """
import sys
import lowbit_tp.runtime.shard as shard
from lowbit_tp.collectives import dist
shard.all_reduce = lambda *a: None
setattr(dist, "dist", object())
sys.modules["lowbit_tp.collectives.dist"].dist = None
"""
    assert {f.split(':')[0] for f in patches_in(bad)} == {'line 5', 'line 6', 'line 7'}
    ok = """
import torch
class A:
    def __init__(self):
        self.x = 1
def f(model, parent):
    setattr(parent, "o_proj", torch.nn.Identity())
    model.x = 2
"""
    assert patches_in(ok) == []


def test_no_module_of_lowbit_tp_patches_another():
    offenders = {}
    for path in sorted(ROOT.rglob("*.py")):
        found = patches_in(path.read_text())
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}
