"""The result scripts pass their ``--seed`` on to the measurement (scripts/frontier.py once
recorded ``--seed N`` in its docs command but measured on EvalConfig's default windows).

A static check of the scripts' source: every call of ``calibrate_and_evaluate`` in a script
that has a ``--seed`` flag passes ``seed=args.seed``.
"""
import ast
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == name:
            yield node


def _has_seed_flag(tree: ast.AST) -> bool:
    return any(isinstance(a, ast.Constant) and a.value == "--seed"
               for c in ast.walk(tree) if isinstance(c, ast.Call) and getattr(c.func, "attr", None) == "add_argument"
               for a in c.args)


def _passes_seed(call: ast.Call) -> bool:
    return any(k.arg == "seed" and ast.unparse(k.value) == "args.seed" for k in call.keywords)


@pytest.mark.parametrize("script", ["frontier.py", "reproduce_paper.py"])
def test_seed_flag_reaches_the_measurement(script):
    tree = ast.parse((SCRIPTS / script).read_text())
    calls = list(_calls(tree, "calibrate_and_evaluate"))
    assert calls and _has_seed_flag(tree), script
    assert all(_passes_seed(c) for c in calls), f"{script}: --seed is not passed to calibrate_and_evaluate"


def test_the_check_catches_a_missing_seed():
    tree = ast.parse("calibrate_and_evaluate(m, 2, c, samples=args.samples)")
    assert not any(_passes_seed(c) for c in _calls(tree, "calibrate_and_evaluate"))
