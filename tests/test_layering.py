"""The package's dependencies point one way, and no module imports itself through others.

Every `import` / `from ... import` in llmctl (lazy ones inside functions included; those under
`if TYPE_CHECKING:` excluded, they never run) is an edge. The layers, lowest first:
core < config < {model, data} < runtime < {train, infer} < {interop, experiments} < cli; a
package may import its own layer or lower ones, never a sibling of its layer or anything above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llmctl"
LAYERS = {"core": 0, "config": 1, "model": 2, "data": 2, "runtime": 3, "train": 4,
          "infer": 4, "interop": 5, "experiments": 5, "cli": 6}
TOP_LEVEL = {"__init__", "__main__"}  # llmctl/__init__.py (the version), python -m llmctl


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path, modules: set[str], root: Path = PACKAGE) -> set[str]:
    """The llmctl modules a file imports (a `from pkg import name` of a submodule counts as
    that submodule)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "llmctl")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] != "llmctl":
                    continue
                subs = {f"{target}.{a.name}" for a in child.names} & modules
                found.update(subs or {target})
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(name)
    return {m for m in found if m in modules}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in files}
    return {module_name(p, root): imports_of(p, modules, root) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def layer_of(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in TOP_LEVEL:
        return None
    return parts[1], LAYERS[parts[1]]


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for src, targets in graph.items():
        a = layer_of(src)
        for dst in targets:
            b = layer_of(dst)
            if a is None or b is None or a[0] == b[0]:
                continue
            if b[1] >= a[1]:
                out.append(f"{src} -> {dst} ({a[0]} may not import {b[0]})")
    return sorted(out)


def test_every_package_has_a_layer() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(LAYERS), f"packages without a layer: {sorted(packages - set(LAYERS))}"
    loose = {p.stem for p in PACKAGE.glob("*.py")} - TOP_LEVEL
    assert not loose, f"modules outside a package: {sorted(loose)}"


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_dependencies_point_one_way() -> None:
    assert layering_violations(import_graph()) == []


@pytest.mark.parametrize(("path", "line", "cycle"), [
    # upward: runtime -> train, while train already imports runtime.checkpoint
    ("runtime/checkpoint.py", "from ..train import trainer", True),
    # sideways: train -> infer (no cycle, still a violation)
    ("train/optim.py", "from ..infer import decode", False),
])
def test_the_checks_catch_a_reintroduced_edge(tmp_path: Path, path: str, line: str,
                                              cycle: bool) -> None:
    """Copy the package, add one bad lazy import, and the checks must see it."""
    import shutil

    copy = tmp_path / "llmctl"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / path, "a", encoding="utf-8") as f:
        f.write(f"\n\ndef _lazy():\n    {line}\n")
    graph = import_graph(copy)
    assert layering_violations(graph)
    assert (find_cycle(graph) is not None) == cycle
