from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from zerotunnel.config import Config, ConfigError
from zerotunnel.control.watch import FileConfigSource
from zerotunnel.errors import InputError

POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: default}}
spec: {{action: DENY, rules: [{{}}]}}
"""


def test_load_versions_and_unchanged_text_is_not_a_new_version(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(POLICY.format(name="one"))
    source = FileConfigSource([tmp_path])
    first = source.load()
    assert first.version == 1
    assert [p.meta.name for p in first.config.authorization_policies] == ["one"]
    assert source.load().version == 1
    (tmp_path / "b.yaml").write_text(POLICY.format(name="two"))
    assert source.load().version == 2


def test_bad_change_keeps_last_good(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(POLICY.format(name="one"))
    source = FileConfigSource([tmp_path])
    good = source.load()
    (tmp_path / "a.yaml").write_text(POLICY.format(name="one").replace("DENY", "MAYBE"))
    with pytest.raises(ConfigError, match="action"):
        source.load()
    assert source.current == good


async def test_watch_applies_good_edits_and_reports_bad_ones(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(POLICY.format(name="one"))
    source = FileConfigSource([tmp_path])
    source.load()
    applied: list[tuple[list[str], int]] = []
    errors: list[InputError] = []
    stop = asyncio.Event()

    def on_config(config: Config, version: int) -> None:
        applied.append(([p.meta.name for p in config.authorization_policies], version))

    task = asyncio.create_task(source.watch(on_config, errors.append, stop))
    await asyncio.sleep(0.3)
    (tmp_path / "a.yaml").write_text("kind: [broken")
    for _ in range(60):
        if errors:
            break
        await asyncio.sleep(0.05)
    assert errors and "a.yaml" in str(errors[0])
    assert source.current is not None and source.current.version == 1
    (tmp_path / "a.yaml").write_text(POLICY.format(name="two"))
    for _ in range(60):
        if applied:
            break
        await asyncio.sleep(0.05)
    assert applied == [(["two"], 2)]
    stop.set()
    await asyncio.wait_for(task, 5)
