"""The pod API client against a real Unix-socket server speaking newline-delimited JSON."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from zerotunnel.cluster import podapi


def _server(reply: Callable[[dict[str, Any]], bytes]) -> Callable[..., Any]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        writer.write(reply(json.loads(line)))
        await writer.drain()
        writer.close()
    return handle


@pytest.fixture
async def sock(tmp_path: Path) -> AsyncIterator[Path]:
    path = tmp_path / "node.sock"

    def answer(req: dict[str, Any]) -> bytes:
        if req["op"] == "add" and req["uid"] == "ns/bad":
            return b'{"ok": false, "error": "no such netns"}\n'
        if req["op"] == "list":
            return b'{"ok": true, "pods": [{"uid": "ns/a", "ready": true}]}\n'
        if req["op"] == "garbage":
            return b"not json\n"
        if req["op"] == "silent":
            return b""
        return json.dumps({"ok": True, "echo": req}).encode() + b"\n"

    server = await asyncio.start_unix_server(_server(answer), path=str(path))
    async with server:
        yield path


async def test_add_ok_and_refusal(sock: Path) -> None:
    req = {"op": "add", "uid": "ns/a", "netns": "/run/netns/x", "ip": "10.0.0.2"}
    reply = await podapi.request(sock, req)
    assert reply["echo"]["netns"] == "/run/netns/x"
    with pytest.raises(podapi.PodApiError, match="refused add ns/bad: no such netns"):
        await podapi.request(sock, {"op": "add", "uid": "ns/bad"})


async def test_list_sync(sock: Path) -> None:
    reply = await asyncio.to_thread(podapi.request_sync, sock, {"op": "list"})
    assert reply["pods"] == [{"uid": "ns/a", "ready": True}]


async def test_bad_answers(sock: Path) -> None:
    with pytest.raises(podapi.PodApiError, match="not JSON"):
        await podapi.request(sock, {"op": "garbage"})
    with pytest.raises(podapi.PodApiError, match="without an answer"):
        await podapi.request(sock, {"op": "silent"})
    with pytest.raises(podapi.PodApiError, match="without an answer"):
        await asyncio.to_thread(podapi.request_sync, sock, {"op": "silent"})


async def test_unreachable_and_timeout(tmp_path: Path) -> None:
    with pytest.raises(podapi.PodApiError, match="pod API"):
        await podapi.request(tmp_path / "none.sock", {"op": "list"})
    with pytest.raises(podapi.PodApiError, match="pod API"):
        podapi.request_sync(tmp_path / "none.sock", {"op": "list"})
    path = tmp_path / "slow.sock"

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    server = await asyncio.start_unix_server(never, path=str(path))
    async with server:
        with pytest.raises(podapi.PodApiError, match="no answer to add"):
            await podapi.request(path, {"op": "add"}, timeout=0.2)
