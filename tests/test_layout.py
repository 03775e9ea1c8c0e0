"""The house rules of the layout (DESIGN.md): the import contract, small modules, short functions."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = ("node", "handlers", "models", "rules", "simulator", "storage")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
#: A longer function says why in its docstring, in a sentence that starts with these words.
LONG_REASON = "Long because"


def library_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_import_contract_is_kept() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "import-linter is not installed: ./dev setup installs it with the test extras"
    r = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_no_library_module_over_500_lines() -> None:
    """A longer module says why in its docstring, as a longer function does (``LONG_REASON``)."""
    long = {
        p.relative_to(ROOT).as_posix(): n
        for p in library_modules()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
        and LONG_REASON not in (ast.get_docstring(ast.parse(p.read_text())) or "")
    }
    assert long == {}


def test_no_library_function_over_80_lines_without_a_reason() -> None:
    long = {}
    for path in library_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and LONG_REASON not in (ast.get_docstring(node) or ""):
                    long[f"{path.relative_to(ROOT).as_posix()}:{node.name}"] = lines
    assert long == {}
