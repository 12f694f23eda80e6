"""The package's arrows (docs/architecture.md): no import cycle, layers import only what they may, DeepSpeed in
train/ alone, and every module imports on its own in a fresh interpreter.

Run the same check by hand with ``python -m pytest tests/test_architecture.py -q``.
"""

import ast
import re
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("earlybert_pretrain", "data_prep")

# What each part may import from the project (besides itself); anything else is an arrow pointing the wrong way.
ALLOWED = {
    "earlybert_pretrain.errors": set(),
    "earlybert_pretrain.common": {"earlybert_pretrain.errors"},
    "earlybert_pretrain.model": {"earlybert_pretrain.common", "earlybert_pretrain.errors"},
    "earlybert_pretrain.train": {"earlybert_pretrain.common", "earlybert_pretrain.errors", "earlybert_pretrain.config"},
    "earlybert_pretrain.tickets": {"earlybert_pretrain.model", "earlybert_pretrain.common", "earlybert_pretrain.errors",
                                   "earlybert_pretrain.config"},
    "earlybert_pretrain.config": {"earlybert_pretrain.model", "earlybert_pretrain.train", "earlybert_pretrain.errors",
                                  "earlybert_pretrain.common"},
    "data_prep": {"earlybert_pretrain.common", "earlybert_pretrain.errors"},
}
RECIPES = ("earlybert_pretrain.pretrain", "earlybert_pretrain.finetune", "earlybert_pretrain.demo")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports, anywhere in the file (a deferred import is still an arrow)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name in modules:
                found.add(name)
    return found - {module_name(path)}


def part_of(module: str) -> str:
    for part in sorted(ALLOWED, key=len, reverse=True):
        if module == part or module.startswith(part + "."):
            return part
    return module


GRAPH = {name: imports_of(path, project_modules()) for name, path in project_modules().items()}


def test_there_is_no_import_cycle():
    # Packages import their submodules' names only through explicit module paths, so the graph is over modules.
    graph = {name: {dep for dep in deps if not name.startswith(dep + ".")} for name, deps in GRAPH.items()}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")
    assert set(order) == set(graph)


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_what_its_arrows_allow(part):
    wrong = {f"{name} -> {dep}" for name, deps in GRAPH.items() if part_of(name) == part
             for dep in deps if part_of(dep) != part and part_of(dep) not in ALLOWED[part]}
    assert not wrong, sorted(wrong)


def test_nothing_imports_a_recipe_but_recipes_and_the_clis():
    wrong = {f"{name} -> {dep}" for name, deps in GRAPH.items() for dep in deps
             if dep.startswith(RECIPES) and not name.startswith(RECIPES) and not name.endswith(".cli")}
    assert not wrong, sorted(wrong)


def test_deepspeed_is_imported_in_train_alone():
    pattern = re.compile(r"^\s*(import deepspeed|from deepspeed)", re.M)
    offenders = [name for name, path in project_modules().items()
                 if pattern.search(path.read_text()) and not name.startswith("earlybert_pretrain.train.")]
    assert not offenders


def test_every_module_imports_in_a_fresh_interpreter_in_dependency_order():
    """One fresh interpreter imports every module, dependencies first: each one's own imports suffice."""
    graph = {name: {dep for dep in deps if not name.startswith(dep + ".")} for name, deps in GRAPH.items()}
    order = [name for name in TopologicalSorter(graph).static_order() if not name.endswith("__main__")]
    script = f"import importlib\nfor name in {order!r}:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
