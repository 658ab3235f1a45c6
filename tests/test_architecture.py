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


def zhtune_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level part)`` of every ``zhtune.X`` import in ``path``, anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "zhtune" else [f"zhtune.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, n.split(".")[1]) for n in names if n.startswith("zhtune.")]
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
