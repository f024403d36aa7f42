"""Packages import only downward: core <- tp <- workflows <- cli (a lower layer never knows a higher one).

Every import of a ``lowbit_tp`` module, at the top of a file or inside a function, is
checked against the layer table below; a module may import its own layer or lower ones.
"""
import ast
from pathlib import Path

import lowbit_tp

ROOT = Path(lowbit_tp.__file__).parent

# Longest prefix wins. Layers: 0 core, 1 tp, 2 workflows, 3 cli.
LAYERS = {
    "lowbit_tp": 0,  # package root: errors, fileio, configs
    "lowbit_tp.errors": 0,
    "lowbit_tp.configs": 0,  # plain frozen dataclasses, torch-free: every layer and the CLI read them
    "lowbit_tp.fileio": 0,
    "lowbit_tp.results": 0,
    "lowbit_tp.codecs": 0,
    "lowbit_tp.kernels": 0,
    "lowbit_tp.collectives": 0,
    "lowbit_tp.calibration": 0,  # the artifact and its statistics
    "lowbit_tp.data": 0,
    "lowbit_tp.tp": 1,
    "lowbit_tp.models": 1,
    "lowbit_tp.simulator": 1,
    "lowbit_tp.runtime": 1,
    "lowbit_tp.integrations": 1,
    "lowbit_tp.preflight": 1,
    "lowbit_tp.workflows": 2,
    "lowbit_tp.calibration.pipeline": 2,
    "lowbit_tp.calibration.allocate": 2,
    "lowbit_tp.calibration.fisher": 2,  # the Fisher pass runs the model
    "lowbit_tp.evaluation": 2,
    "lowbit_tp.bench": 2,
    "lowbit_tp.demo": 2,
    "lowbit_tp.cli": 3,  # the one CLI package; nothing else is in the cli layer
}
NAMES = {0: "core", 1: "tp", 2: "workflows", 3: "cli"}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(module)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("lowbit_tp")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowbit_tp"):
            for a in node.names:  # `from lowbit_tp.x import y` may name a submodule y
                full = f"{node.module}.{a.name}"
                out.append((node.lineno, full if (ROOT.parent / full.replace(".", "/")).exists()
                            or (ROOT.parent / (full.replace(".", "/") + ".py")).exists() else node.module))
    return out


def violations() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        me = module_name(path)
        mine = layer_of(me)
        for line, target in imports_of(path):
            if layer_of(target) > mine:
                found.append(f"{me} ({NAMES[mine]}) line {line} imports {target} ({NAMES[layer_of(target)]})")
    return found


def test_every_module_has_a_layer():
    for path in ROOT.rglob("*.py"):
        layer_of(module_name(path))


def test_packages_import_only_downward():
    assert violations() == []


def test_the_table_orders_the_layers():
    assert layer_of("lowbit_tp.codecs.base") < layer_of("lowbit_tp.simulator.tp_sim") \
        < layer_of("lowbit_tp.evaluation.on_ranks") < layer_of("lowbit_tp.cli.eval")
    assert layer_of("lowbit_tp.calibration.artifact") == 0 and layer_of("lowbit_tp.calibration.pipeline") == 2


def test_the_cli_is_one_package_and_the_only_argparse_user():
    users = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if "argparse" in p.read_text())
    assert users and all(u.startswith("cli/") for u in users), users
    assert [m for m in LAYERS if LAYERS[m] == 3] == ["lowbit_tp.cli"]


# Function-local imports of the package's own modules, counted by the test below. The ones
# left are needed: the CLI imports library code (torch) only when a command runs, so that
# `--help` stays fast; codecs import their kernel back ends (Triton, the C++ extension) only
# on the path that uses them; the vLLM integration must not import vLLM or torch until vLLM
# loads it; the transformers engine imports transformers' TP machinery only when chosen; one
# breaks the cycle calibration.pipeline -> allocate -> evaluation; bench.device_script imports
# a kernel module only after it has set TRITON_INTERPRET (a dry run's kernels must be made for
# the interpreter; stop 27, replacing a sys.modules scan that test_no_monkeypatching forbids).
# The bound only goes down otherwise.
MAX_LOCAL_IMPORTS = 52


def local_imports() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if id(node) in top or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(n.startswith("lowbit_tp") for n in names):
                found.append(f"{module_name(path)}:{node.lineno}")
    return found


def test_function_local_imports_of_the_package_only_go_down():
    found = local_imports()
    assert len(found) <= MAX_LOCAL_IMPORTS, (
        f"{len(found)} function-local imports of lowbit_tp modules (at most {MAX_LOCAL_IMPORTS}); import at the "
        f"top unless it is for --help's speed, an optional dependency or a cycle:\n" + "\n".join(found))
