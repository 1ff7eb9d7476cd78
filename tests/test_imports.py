"""Which package may import which: read from every module's source with ``ast`` (lazy imports inside
functions count), and ``lycoris_core`` imported for real without a framework."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package -> top-level packages none of its modules may import, and why.
RULES = {
    "lycoris_core": (
        {"jax", "flax", "torch", "lycoris_jax", "lycoris_torch", "parity_tests", "lycoris_cli"},
        "framework-free",
    ),
    "lycoris_jax": ({"lycoris_torch", "parity_tests", "lycoris_cli"}, "the Flax twin stands alone"),
}


def imported(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level package)`` of every absolute import in ``path``, also ``importlib.import_module("x")``
    and ``__import__("x")`` with a literal name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return [(line, name.split(".")[0]) for line, name in found]


@pytest.mark.parametrize("package", sorted(RULES))
def test_packages_import_only_what_they_may(package):
    forbidden, why = RULES[package]
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules, f"{package}: no modules found under {ROOT / package}"
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in modules
        for line, name in imported(path)
        if name in forbidden
    ]
    assert not bad, f"{package} ({why}) must not import {sorted(forbidden)}: {bad}"


def test_the_rule_sees_lazy_and_dynamic_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "import os\n"
        "def f():\n    import torch.nn\n    from parity_tests.check import x\n"
        "    import importlib\n    importlib.import_module('lycoris_cli.cli')\n    from . import sibling\n"
    )
    assert sorted(name for _, name in imported(source)) == ["importlib", "lycoris_cli", "os", "parity_tests", "torch"]


def test_core_imports_neither_torch_nor_jax():
    code = "import sys, lycoris_core; bad = {'torch', 'jax', 'flax'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
