"""The package's import graph, read with ``ast`` (nothing imported): no import cycle, at module level or through
an import inside a function (which would only hide one), and the LLM path does not reach into the image data
package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bilora_diffusion import errors

PACKAGE = Path(__file__).resolve().parents[2] / "bilora_diffusion"


def module_names(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    found = {}
    for file in root.rglob("*.py"):
        parts = list(file.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (file, is_package)
    return found


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _in_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return True
    return False


def import_graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, all edges) between the modules under ``root``: ``a -> b`` when ``a`` imports ``b``
    (``from . import x`` counts as importing submodule ``x`` when it is one). Imports under
    ``if TYPE_CHECKING:`` are left out: they never run."""
    modules = module_names(root)
    top: dict[str, set[str]] = {m: set() for m in modules}
    every: dict[str, set[str]] = {m: set() for m in modules}
    for name, (file, is_package) in modules.items():
        tree = ast.parse(file.read_text(), str(file))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [
                    f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                    for alias in node.names
                ]
            else:
                continue
            if _type_checking_only(node, parents):
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    every[name].add(target)
                    if not _in_function(node, parents):
                        top[name].add(target)
    return top, every


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (each holds at least one cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def write_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def test_the_checker_finds_module_level_and_hidden_cycles(tmp_path: Path) -> None:
    package = write_package(
        tmp_path,
        {
            "a.py": "from .b import x\n",
            "b.py": "from . import a\nx = 1\n",
            "c.py": "def f():\n    from .sub.d import y\n",
            "sub/__init__.py": "",
            "sub/d.py": "from ..c import f\ny = 2\n",
            "e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .f import z\n",
            "f.py": "from .e import TYPE_CHECKING\nz = 3\n",
        },
    )
    top, every = import_graph(package)
    assert cycles(top) == [["pkg.a", "pkg.b"]]
    assert cycles(every) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub.d"]]  # e <-> f only under TYPE_CHECKING


def test_no_import_cycle_in_the_package() -> None:
    top, every = import_graph(PACKAGE)
    assert "bilora_diffusion.sdxl.export" in top["bilora_diffusion.sdxl.train"]  # the graph is real
    assert cycles(top) == []
    # An import inside a function that closes a cycle only hides it.
    assert cycles(every) == []


def test_the_llm_path_does_not_import_the_image_data_package() -> None:
    _, every = import_graph(PACKAGE)
    llm = {m: targets for m, targets in every.items() if m.startswith("bilora_diffusion.llm")}
    assert llm and not [
        (m, t) for m, targets in llm.items() for t in targets if t.startswith("bilora_diffusion.data")
    ]


@pytest.mark.parametrize("name", [n for n in errors.__all__ if n != "BiLoRAError"])
def test_every_user_error_has_the_common_base(name: str) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, errors.BiLoRAError) and issubclass(cls, (ValueError, RuntimeError))
