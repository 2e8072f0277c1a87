from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from zerotunnel.errors import InputError
from zerotunnel.mesh.build import Addresses
from zerotunnel.node.addresses import follow_addresses, read_addresses


def test_read_addresses_and_its_errors(tmp_path: Path) -> None:
    f = tmp_path / "addresses.json"
    assert read_addresses(None) == Addresses()
    with pytest.raises(InputError, match="does not exist"):
        read_addresses(f)
    f.write_text("[1]")
    with pytest.raises(InputError, match="expected a JSON object"):
        read_addresses(f)
    f.write_text('{"pod_ips": []}')
    with pytest.raises(InputError, match="must be objects"):
        read_addresses(f)
    f.write_text(json.dumps({"pod_ips": {"ns/a": "10.0.0.2"}, "service_vips": {"ns/s": "10.96.0.1"}}))
    got = read_addresses(f)
    assert (dict(got.pod_ips), dict(got.service_vips)) == ({"ns/a": "10.0.0.2"}, {"ns/s": "10.96.0.1"})


async def test_follow_addresses_yields_new_valid_versions_only(tmp_path: Path) -> None:
    f = tmp_path / "addresses.json"
    f.write_text(json.dumps({"pod_ips": {"ns/a": "10.0.0.2"}}))
    state = {"current": read_addresses(f)}
    stop = asyncio.Event()
    seen: list[Addresses] = []

    async def follow() -> None:
        async for addresses in follow_addresses(f, stop, lambda: state["current"]):
            seen.append(addresses)
            state["current"] = addresses

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.3)
    f.write_text("{broken")  # kept out: the previous addresses stay
    await asyncio.sleep(0.5)
    assert seen == []
    tmp = tmp_path / "addresses.json.tmp"
    tmp.write_text(json.dumps({"pod_ips": {"ns/a": "10.0.0.3"}}))
    tmp.replace(f)  # the runner's atomic write
    for _ in range(50):
        if seen:
            break
        await asyncio.sleep(0.05)
    assert [dict(a.pod_ips) for a in seen] == [{"ns/a": "10.0.0.3"}]
    stop.set()
    await asyncio.wait_for(task, 5)
