"""The package's layers import one way: downwards. An upward import, an import between sibling packages of one
layer, or an import cycle between modules fails here, naming the files and lines.

    files, devices, errors              (the bottom: atomic writes and safe loading, devices, error types)
    data                                 (data sets, their records, tasks and metrics, augmentation)
    models                               (the networks; may read data's records)
    inference                            (inference engines over a model)
    training, deploy, analysis           (siblings: none imports another)
    bench                                (benchmarks, run only as commands)
    commands, cli, __main__, the package face     (use everything; nothing imports a command)

An import inside ``if __name__ == "__main__":`` or ``if TYPE_CHECKING:`` does not count.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "densenet"
LAYERS = {"errors": 0, "files": 0, "devices": 0, "data": 1, "models": 2, "inference": 3, "training": 4, "deploy": 4,
          "analysis": 4, "bench": 5, "commands": 6, "cli": 6, "__main__": 6, "__init__": 6}


def _part(module: str) -> str:
    """densenet.models.weights -> models; densenet -> __init__ (the package face)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(tree: ast.AST):
    """(line, imported module) of every import, at any depth, but not under __main__ or TYPE_CHECKING guards."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ("__main__" in ast.unparse(node.test) or "TYPE_CHECKING" in ast.unparse(
                node.test)):
            yield from (item for child in node.orelse for item in _imports(child))
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("densenet"):
            names = [node.module] if node.module != "densenet" else [f"densenet.{a.name}" for a in node.names]
            yield from ((node.lineno, name) for name in names)
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.startswith("densenet"))
        yield from _imports(node)


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__.py)."""
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(("densenet", *parts))] = path
    return found


def layer_violations() -> list[str]:
    found = []
    for module, path in _modules().items():
        importer = _part(module) if path.parent != SRC else path.stem
        for line, target in _imports(ast.parse(path.read_text())):
            imported = _part(target)
            if imported not in LAYERS:  # densenet.__version__ and the like: the package face
                imported = "__init__"
            where = f"{path.relative_to(SRC)}:{line}"
            if imported == importer:
                continue
            if LAYERS[imported] > LAYERS[importer]:
                found.append(f"{where}: {importer} imports {target} (a higher layer)")
            elif LAYERS[imported] == LAYERS[importer] and LAYERS[importer] not in (0, LAYERS["cli"]):
                found.append(f"{where}: {importer} imports {target} (a sibling package)")
            elif imported == "bench" and importer not in ("commands", "cli"):
                found.append(f"{where}: only the command line imports bench/")
    return found


def import_cycles() -> list[str]:
    """Each cycle of imports between modules, as 'a (a.py) -> b (b.py) -> a (a.py)'. Imports inside functions count
    too: a lazy import hides a cycle from Python, not from a reader."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:  # from densenet.inference import runtimes: the module
                targets.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                               for a in node.names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        graph[module] = {t for t in targets if t in modules and t != module}
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                cycles.append(" -> ".join(f"{m} ({modules[m].relative_to(SRC)})" for m in cycle))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_no_layer_imports_a_higher_one_or_a_sibling():
    assert layer_violations() == []


@pytest.mark.slow
def test_no_import_cycles():
    assert import_cycles() == []


def test_the_check_sees_an_upward_and_a_sibling_import(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "bad.py").write_text("def f():\n    from densenet.training.checkpoint import LAST\n")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "ok.py").write_text("from densenet.models.densenet import DenseNet\n")
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "sib.py").write_text("from densenet.training.checkpoint import LAST\n")
    monkeypatch.setattr(f"{__name__}.SRC", tmp_path)
    assert layer_violations() == ["deploy/sib.py:1: deploy imports densenet.training.checkpoint (a sibling package)",
                                  "models/bad.py:2: models imports densenet.training.checkpoint (a higher layer)"]


def test_the_check_sees_a_cycle(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "a.py").write_text("from densenet.models.b import X\n")
    (tmp_path / "models" / "b.py").write_text("X = 1\n")
    (tmp_path / "models" / "c.py").write_text("def f():\n    from densenet.models.a import Y\n")
    monkeypatch.setattr(f"{__name__}.SRC", tmp_path)
    assert import_cycles() == []
    (tmp_path / "models" / "b.py").write_text("def f():\n    from densenet.models import a\n")  # lazy, and by name
    assert import_cycles() == ["densenet.models.a (models/a.py) -> densenet.models.b (models/b.py) -> "
                               "densenet.models.a (models/a.py)"]
