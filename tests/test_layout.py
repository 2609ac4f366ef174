"""The package's layering: each module imports only modules listed below it in the README's Layout."""

from __future__ import annotations

import ast
import re

import pytest
from conftest import ROOT

LAYOUT = re.search(r"## Layout.*?```\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL).group(1)
ORDER = [line.split()[0] for line in LAYOUT.splitlines() if line.startswith("gpt/")]


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def imported_modules(path: str) -> set[str]:
    """Every gpt module a file imports, at its top or inside functions (not under `if TYPE_CHECKING`)."""
    tree = ast.parse((ROOT / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gpt"):
            for alias in node.names:  # `from gpt import metrics` imports the module gpt.metrics
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if (ROOT / (candidate.replace(".", "/") + ".py")).is_file() else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("gpt.")}
    return found


def test_the_layout_names_every_module_once():
    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "gpt").rglob("*.py") if p.name != "__init__.py")
    assert sorted(ORDER) == modules, "README's Layout must list every module of gpt/ exactly once"


@pytest.mark.parametrize("path", ORDER)
def test_a_module_imports_only_modules_below_it(path):
    below = {module_name(p) for p in ORDER[ORDER.index(path) + 1 :]}
    above = sorted(imported_modules(path) - below - {"gpt", "gpt.ablation"})
    assert not above, f"{path} imports {above}, listed above it (or not at all) in the README's Layout"
