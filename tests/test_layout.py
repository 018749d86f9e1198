"""The package's layout keeps its promises (docs/design.md, "Floors"): every import points down, and imports of
tunesmith's own modules stand at the top of a module except in cli/ and serve/ (start-up time)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tunesmith"
# bottom up, as docs/design.md draws them; packages on one floor may import each other only downwards in this list
FLOORS = [["core"], ["config", "methods"], ["models", "data"], ["inference", "training"], ["stages"],
          ["evaluation", "export"], ["forgetting"], ["pipeline"], ["workflows"], ["serve"], ["cli"]]
FLOOR = {package: level for level, packages in enumerate(FLOORS) for package in packages}
LAZY_ALLOWED = ("cli", "serve")


def modules():
    return sorted(p for p in SRC.rglob("*.py") if p.parent != SRC)


def package_of(path: Path) -> str:
    return path.relative_to(SRC).parts[0]


def own_imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("tunesmith."):
            yield node, node.module.split(".")[1]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "tunesmith":
            for alias in node.names:
                if alias.name != "__version__":
                    yield node, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tunesmith."):
                    yield node, alias.name.split(".")[1]


def test_every_module_lives_in_a_layer_folder():
    loose = sorted(p.name for p in SRC.glob("*.py") if p.name not in {"__init__.py", "__main__.py"})
    assert loose == [], f"modules at the top of the package, outside every floor: {loose}"
    folders = sorted(p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == sorted(FLOOR), "a package folder that docs/design.md's floors do not name (or the reverse)"


def test_imports_point_down():
    upward = []
    for path in modules():
        here = package_of(path)
        upward += [f"{path.relative_to(SRC)}:{node.lineno} (floor {FLOOR[here]}) imports tunesmith.{target} "
                   f"(floor {FLOOR[target]})" for node, target in own_imports(ast.parse(path.read_text()))
                   if target in FLOOR and FLOOR[target] > FLOOR[here]]
    assert upward == []


def test_own_imports_stand_at_the_top():
    inner = []
    for path in modules():
        if package_of(path) in LAZY_ALLOWED:
            continue
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        inner += [f"{path.relative_to(SRC)}:{node.lineno}" for node, _ in own_imports(tree) if id(node) not in top]
    assert inner == [], "imports of tunesmith modules inside functions (only cli/ and serve/ may, for start-up time)"


def test_every_own_import_names_what_exists():
    """Also the imports inside cli/ and serve/ handlers, which only run when a person takes that path: a module moved
    or a name renamed must not wait for the first user to find it."""
    import importlib

    missing = []
    for path in modules():
        for node, _ in own_imports(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names]
            module_name = node.module if isinstance(node, ast.ImportFrom) else None
            try:
                module = importlib.import_module(module_name or names[0])
            except ImportError as error:
                missing.append(f"{path.relative_to(SRC)}:{node.lineno}: {error}")
                continue
            for name in names if module_name else ():
                if not hasattr(module, name):
                    try:
                        importlib.import_module(f"{module_name}.{name}")
                    except ImportError:
                        missing.append(f"{path.relative_to(SRC)}:{node.lineno}: {module_name} has no {name}")
    assert missing == []
