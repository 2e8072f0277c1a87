from __future__ import annotations

import sys
from pathlib import Path

import pytest

from zerotunnel.testing.modules import load_by_path


def test_loads_once_and_registers(tmp_path: Path) -> None:
    path = tmp_path / "helper.py"
    path.write_text("LOADS = []\nLOADS.append(1)\n")
    first = load_by_path(path, "zt_test_modules_helper")
    second = load_by_path(path, "zt_test_modules_helper")
    try:
        assert first is second and first.LOADS == [1]
        assert sys.modules["zt_test_modules_helper"] is first
    finally:
        del sys.modules["zt_test_modules_helper"]


def test_a_module_that_fails_is_not_left_registered(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('broken helper')\n")
    with pytest.raises(RuntimeError, match="broken helper"):
        load_by_path(path, "zt_test_modules_broken")
    assert "zt_test_modules_broken" not in sys.modules


def test_not_a_python_file(tmp_path: Path) -> None:
    with pytest.raises(ImportError, match="cannot load"):
        load_by_path(tmp_path / "data.json", "zt_test_modules_json")
