"""Imports go one way: store ← trainer ← analyzer ← cli.py.

A module may import only from its own package or from packages to its left; function-local
and ``TYPE_CHECKING`` imports count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

FORBIDDEN = {"store": {"trainer", "analyzer", "cli"},
             "trainer": {"analyzer", "cli"},
             "analyzer": {"cli"}}


def imported_packages(path: Path) -> set[str]:
    """The top-level names of every absolute import in ``path``, wherever it stands."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names  # relative imports stay inside their own package


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_a_package_to_its_right(package):
    assert modules(package), f"no modules found in {package}/"
    wrong = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
             for path in modules(package)}
    assert {path: names for path, names in wrong.items() if names} == {}


def test_the_import_parser_sees_function_local_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from analyzer.onnx_export import X\n    import cli\n")
    assert imported_packages(module) == {"analyzer", "cli"}
