"""The trainer's modules form a stack: each imports only those below it, at the top of the file.

Every module is imported alone in a fresh interpreter (an import cycle shows up as an ImportError there, or
only in some orders), and the import graph read from the sources must have no cycle and no import inside a
function body that names another trainer module (the way cycles used to be hidden).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import vlcore.train

TRAIN_DIR = Path(vlcore.train.__file__).parent
MODULES = sorted(p.stem for p in TRAIN_DIR.glob("*.py") if p.stem not in ("__init__", "__main__"))


def _trainer_imports(path: Path) -> tuple[set[str], list[str]]:
    """(trainer modules imported at the top level, trainer imports found inside functions)."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found = {n.split(".")[2] for n in names if n.startswith("vlcore.train.") and n.split(".")[2] in MODULES}
        if node in tree.body:
            top |= found
        elif found:
            nested.append(f"{path.name}:{node.lineno}")
    return top, nested


def test_every_module_imports_alone():
    # One interpreter (torch and vlcore.models loaded once, for speed); before each module every
    # vlcore.train module is forgotten, so each is imported with no trainer module loaded before it.
    script = f"""
import sys, importlib, vlcore.models
for module in {MODULES!r}:
    for name in [n for n in sys.modules if n == "vlcore.train" or n.startswith("vlcore.train.")]:
        del sys.modules[name]
    importlib.import_module("vlcore.train." + module)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_no_cycles_and_no_imports_hidden_in_functions():
    graph, hidden = {}, []
    for module in MODULES:
        graph[module], nested = _trainer_imports(TRAIN_DIR / f"{module}.py")
        hidden += nested
    assert not hidden, f"trainer imports inside functions: {hidden}"
    # Depth-first search for a back edge.
    state = {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                pytest.fail(f"import cycle: {' -> '.join(path + [module, dep])}")
            if dep not in state:
                visit(dep, path + [module])
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module, [])
    # The command lines sit on top: nothing imports them.
    assert not [m for m in MODULES if "cli" in graph[m]]


@pytest.mark.parametrize("old, name, new", [
    ("vlcore.train.main", "main", "vlcore.train.cli.main"),
    ("vlcore.train.main", "cli", "vlcore.train.cli.train_cli"),
    ("vlcore.train.main", "build_model", "vlcore.train.builders.build_model"),
    ("vlcore.train.evaluate", "retrieval_metrics", "vlcore.train.metrics.retrieval_metrics"),
    ("vlcore.train.evaluate", "eval_main", "vlcore.train.cli.eval_main"),
])
def test_old_import_paths_warn_and_still_work(old, name, new):
    import importlib

    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to {new}"):
        value = getattr(module, name)
    new_module, new_name = new.rsplit(".", 1)
    assert value is getattr(importlib.import_module(new_module), new_name)
    with pytest.raises(AttributeError):
        getattr(module, "no_such_name")
