"""The package's layers import one way: downwards. A new upward import fails here, naming the file and line.

    files, devices, errors              (the bottom: atomic writes and safe loading, devices, error types)
    data                                 (data sets, their records, augmentation)
    models                               (the networks; may read data's records)
    training, inference, deploy, analysis   (use models and data)
    bench                                (uses everything below; nothing but the CLI imports it)
    cli, __main__, the package face     (use everything)

An import inside ``if __name__ == "__main__":`` or ``if TYPE_CHECKING:`` does not count.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "densenet"
LAYERS = {"errors": 0, "files": 0, "devices": 0, "data": 1, "models": 2, "training": 3, "inference": 3, "deploy": 3,
          "analysis": 3, "bench": 4, "cli": 5, "__main__": 5, "__init__": 5}


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


def upward_imports() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        module = ".".join(("densenet", *path.relative_to(SRC).with_suffix("").parts))
        importer = _part(module) if path.parent != SRC else path.stem
        for line, target in _imports(ast.parse(path.read_text())):
            imported = _part(target)
            if imported not in LAYERS:  # densenet.__version__ and the like: the package face
                imported = "__init__"
            if imported != importer and LAYERS[imported] > LAYERS[importer]:
                found.append(f"{path.relative_to(SRC)}:{line}: {importer} imports {target}")
            elif imported == "bench" and importer not in ("bench", "cli"):
                found.append(f"{path.relative_to(SRC)}:{line}: only the command line imports bench/")
    return found


def test_no_layer_imports_a_higher_one():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "bad.py").write_text("def f():\n    from densenet.training.checkpoint import LAST\n")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "ok.py").write_text("from densenet.models.densenet import DenseNet\n")
    monkeypatch.setattr(f"{__name__}.SRC", tmp_path)
    assert upward_imports() == ["models/bad.py:2: models imports densenet.training.checkpoint"]
