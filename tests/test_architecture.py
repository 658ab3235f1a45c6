"""The layering of the package, enforced: lower layers never import higher ones (imports inside
functions included, where they would otherwise hide)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "zhtune"
BASE = {"errors", "config", "flags", "rundir", "plots", "progress", "parallel", "allocator", "__init__", "__version__"}
ALLOWED = {
    "base": BASE,
    "llm": BASE | {"llm"},
    "data": BASE | {"data", "models", "llm"},
    "models": BASE | {"data", "models"},
    "vocab": BASE | {"data", "models", "vocab"},
    "infer": BASE | {"data", "models", "infer", "llm"},
    "eval": BASE | {"data", "models", "infer", "llm", "eval"},
    "train": BASE | {"data", "models", "train"},
}
"""Layer -> the top-level parts of zhtune it may import (pipelines, cli and __main__ import anything
below them)."""


def layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    name = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    return "base" if name in BASE else name


def imported_names(node: ast.AST) -> list[str]:
    """What an import statement names: ``import a.b`` -> ``a.b``; ``from a import b`` -> ``a`` and
    ``a.b`` (``b`` may be a module); anything else (or a relative import) -> nothing."""
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return []


def zhtune_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level part)`` of every ``zhtune.X`` import in ``path``, anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        parts = {n.split(".")[1] for n in imported_names(node) if n.startswith("zhtune.")}
        found += [(node.lineno, part) for part in sorted(parts)]
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if layer(p) in ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_imports_only_lower_layers(path):
    allowed = ALLOWED[layer(path)]
    wrong = [f"line {line}: zhtune.{part}" for line, part in zhtune_imports(path) if part not in allowed]
    assert not wrong, f"{path.relative_to(PACKAGE)} ({layer(path)}) imports a higher layer: {wrong}"


def test_nothing_imports_the_cli():
    users = [p for p in PACKAGE.rglob("*.py") if p.stem not in ("cli", "__main__")
             and any(part == "cli" for _, part in zhtune_imports(p))]  # fmt: skip
    assert not users


def test_help_imports_no_heavy_library():
    """``zhtune --help`` stays instant (about 0.2 s): stages import torch, transformers, peft,
    accelerate and the rest lazily, so the parser alone loads none of them. (Checked by what is
    imported, not by timing.)"""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from zhtune.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "heavy = ['torch', 'transformers', 'peft', 'accelerate', 'datasets', 'numpy', 'matplotlib']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def module_graph() -> dict[str, set[str]]:
    """Module -> the zhtune modules it imports when it runs, anywhere in the file (``from zhtune.x
    import y`` counts ``zhtune.x.y`` when that is a module); ``if TYPE_CHECKING:`` imports, for
    annotations only, never run and are left out."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree, targets = ast.parse(path.read_text(encoding="utf-8")), set()
        typing_only = {
            id(inner) for block in ast.walk(tree)
            if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
            for inner in ast.walk(block)
        }  # fmt: skip
        for node in ast.walk(tree):
            if id(node) not in typing_only:
                targets |= {n for n in imported_names(node) if n in modules and n not in (name, "zhtune")}
        graph[name] = targets
    return graph


def test_no_import_cycle():
    """No two modules import each other, directly or through others (Tarjan's strongly connected
    components over every import, function-level ones included)."""
    graph, index, low, stack, on_stack, cycles = module_graph(), {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles


def test_files_and_functions_stay_readable():
    """No source file over 800 lines and no function over 150: a stage reads in one sitting."""
    long_files, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        rel = str(path.relative_to(PACKAGE))
        if text.count("\n") > 800:
            long_files.append(rel)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 150:
                long_functions.append(f"{rel}:{node.name}")
    assert not long_files and not long_functions
