"""DESIGN.md §5: the pure packages do no I/O, read no clock and no environment.

Time and configuration are passed in; that is what makes the mesh's logic testable with a fake clock
and what keeps the shells thin. The check walks each module's AST, so an import hidden in a function
is caught as well as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "zerotunnel"
PURE_PACKAGES = ("config", "identity", "policy", "mesh", "hbone")
FORBIDDEN_MODULES = {"asyncio", "socket", "grpc", "subprocess", "selectors", "ssl", "threading", "uvloop"}
# attribute calls that read a clock or the environment
FORBIDDEN_CALLS = {
    ("time", "time"), ("time", "monotonic"), ("time", "perf_counter"), ("time", "time_ns"),
    ("time", "monotonic_ns"), ("datetime", "now"), ("datetime", "utcnow"), ("datetime", "today"),
    ("date", "today"), ("os", "getenv"), ("os", "environ"), ("os", "getenvb"), ("os", "environb"),
}

# pathlib / file-object methods that touch the file system
FILE_IO_METHODS = {
    "read_text", "read_bytes", "write_text", "write_bytes",
    "iterdir", "rglob", "glob", "mkdir", "unlink", "chmod",
}


def _pure_modules() -> list[Path]:
    return sorted(p for pkg in PURE_PACKAGES for p in (SRC / pkg).rglob("*.py"))


def _owner_name(node: ast.expr) -> str:
    """`datetime` for both `datetime.now` and `datetime.datetime.now`."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"line {node.lineno}: from {node.module} import ...")
            if node.module == "os" and any(a.name in {"environ", "getenv"} for a in node.names):
                found.append(f"line {node.lineno}: from os import environ/getenv")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
            found.append(f"line {node.lineno}: open()")
        elif isinstance(node, ast.Attribute) and node.attr in FILE_IO_METHODS:
            found.append(f"line {node.lineno}: .{node.attr}()")
        elif isinstance(node, ast.Attribute) and (_owner_name(node.value), node.attr) in FORBIDDEN_CALLS:
            found.append(f"line {node.lineno}: {_owner_name(node.value)}.{node.attr}")
    return found


def test_pure_packages_exist() -> None:
    for pkg in PURE_PACKAGES:
        assert (SRC / pkg / "__init__.py").is_file(), pkg


@pytest.mark.parametrize("path", _pure_modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_pure_module_does_no_io(path: Path) -> None:
    assert _violations(path) == []


def test_checker_catches_violations(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import asyncio\nfrom socket import socket\nimport os\nimport datetime\n"
        "def f(p):\n    import subprocess\n    open(p).read()\n    p.read_text()\n"
        "    return os.environ, datetime.datetime.now()\n"
    )
    found = " ".join(_violations(bad))
    for needle in ("asyncio", "socket", "subprocess", "os.environ", "datetime.now", "open()", ".read_text()"):
        assert needle in found
