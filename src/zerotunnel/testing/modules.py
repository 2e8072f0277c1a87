"""Loading a Python file as a module by its path, once per process.

The test suite runs with `--import-mode=importlib`, so test files and conftests are not importable
by name; suites that reuse another suite's fixtures and helpers (the fault and reliability e2e
tests build on tests/node/test_node_e2e.py, tests/waypoint/...; the fuzz harness's targets) load them
through this one function rather than repeating importlib's four steps.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_by_path(path: Path, name: str) -> ModuleType:
    """The module in `path`, registered in `sys.modules` as `name` (loaded the first time only)."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
