"""labkit's layers, read from its own import statements (every one, also those inside functions):

    core (labkit/*.py, data/, models/, exercises/)  <  distributed/  <  labs/<lab>/  <  course/

A module may import its own layer and the layers below it, never one above; one lab's plumbing does not
import another lab's; nothing imports the course tools but the course tools (and ``python -m labkit``);
there are no import circles; no module is named after a library it would shadow in a notebook.
Each rule is checked on the tree and, so that the check is known to fail when it should, on a small
tree made to break it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

LABKIT = Path(__file__).resolve().parents[2] / "labkit"
ORDER = {"core": 0, "distributed": 1, "labs": 2, "course": 3}
SHADOWING = {"ray", "torch", "torchvision", "lightning", "mlflow", "papermill", "nbval", "pandas", "numpy"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ORDER else "core"


def lab_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "labs" else None


def imports(root: Path) -> dict[str, set[str]]:
    """module -> the labkit modules it imports (``from labkit.x import y`` counts ``labkit.x.y`` when y is a
    module, else ``labkit.x``)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == root.name}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != root.name:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in modules else target)
        graph[name] = {m for m in found if m != name}
    return graph


def violations(root: Path) -> list[str]:
    graph = imports(root)
    found = []
    for module, targets in graph.items():
        if module == f"{root.name}.__main__":      # `python -m labkit` is the course's command
            continue
        for target in targets:
            if ORDER[layer(target)] > ORDER[layer(module)]:
                found.append(f"{module} ({layer(module)}) imports {target} ({layer(target)}), a layer above it")
            elif layer(module) == layer(target) == "labs" and None not in (lab_of(module), lab_of(target)) \
                    and lab_of(module) != lab_of(target):
                found.append(f"{module} imports {target}: one lab's plumbing imports another's")
    return found


def circles(root: Path) -> list[list[str]]:
    graph = imports(root)
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return found


def shadowing(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if (p.suffix == ".py" and p.stem in SHADOWING) or (p.is_dir() and p.name in SHADOWING)]


def test_no_import_runs_up_a_layer_or_across_labs():
    assert violations(LABKIT) == []


def test_no_import_circles():
    assert circles(LABKIT) == []


def test_no_module_shadows_a_library():
    assert shadowing(LABKIT) == []


def test_the_layers_are_folders():
    """The layers the test knows are the folders labkit has (a new top-level folder must be placed in ORDER)."""
    folders = {p.name for p in LABKIT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders - {"data", "models", "exercises"} == set(ORDER) - {"core"}


# --------------------------------------------------------------------------- the checks can fail
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "labkit"
    for rel, text in {"__init__.py": "", "distributed/__init__.py": "", "labs/__init__.py": "",
                      "labs/a/__init__.py": "", "labs/b/__init__.py": "", "course/__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    ({"params.py": "def f():\n    from labkit import distributed\n"}, "labkit.params (core) imports labkit.distributed"),
    ({"env.py": "from labkit.course import cli\n", "course/cli.py": ""}, "labkit.env (core) imports labkit.course.cli"),
    ({"distributed/ddp.py": "from labkit.labs.a import x\n", "labs/a/x.py": ""}, "labkit.distributed.ddp (distributed)"),
    ({"labs/a/x.py": "from labkit.labs.b import y\n", "labs/b/y.py": ""}, "one lab's plumbing imports another's"),
    ({"labs/a/x.py": "from ...course import run\n", "course/run.py": ""}, "labkit.labs.a.x (labs) imports labkit.course.run"),
])
def test_the_layer_check_catches_an_upward_import(tmp_path, files, expected):
    found = violations(_tree(tmp_path, files))
    assert any(expected in line for line in found), found


def test_the_circle_check_catches_a_circle(tmp_path):
    root = _tree(tmp_path, {"a.py": "from labkit import b\n", "b.py": "def f():\n    import labkit.c\n",
                            "c.py": "from labkit.a import x\n"})
    assert circles(root) == [["labkit.a", "labkit.b", "labkit.c", "labkit.a"]]


def test_the_shadow_check_catches_a_module_named_ray(tmp_path):
    assert shadowing(_tree(tmp_path, {"distributed/ray.py": ""})) == ["distributed/ray.py"]
