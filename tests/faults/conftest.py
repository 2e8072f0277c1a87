"""Shared pieces of the fault tests (issue 9, faults; security.md §4 items 24-29).

The two-node mesh of `tests/node/test_node_e2e.py` is reused (its helpers are loaded from that file, so
the topology and the way node proxies are started stay one thing).
Figures go to `$ZT_RELIABILITY_FIGURES` like tests/reliability's.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

FIGURES = Path(os.environ.get("ZT_RELIABILITY_FIGURES", "/tmp/zt-reliability-figures.jsonl"))
SOAK = os.environ.get("ZT_SOAK") == "1"


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[..., None]:
    def record(**values: Any) -> None:
        line = json.dumps({"test": request.node.name, **values}, sort_keys=True)
        print(line)
        with contextlib.suppress(OSError), FIGURES.open("a") as f:
            f.write(line + "\n")

    return record
