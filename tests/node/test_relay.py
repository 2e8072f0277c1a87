from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from typing import Any

Env = Any


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _tunnel(env: Env, handler: str) -> tuple[int, Any]:
    app = await env.app(handler)
    server = await env.server()
    out = await env.outbound(env.pool(), env.key(server), f"127.0.0.1:{app}")
    return out, server


def test_ten_megabytes_both_ways(env: Env) -> None:
    payload = os.urandom(10 * 1024 * 1024)

    async def main() -> None:
        out, _ = await _tunnel(env, "echo")
        reader, writer = await asyncio.open_connection("127.0.0.1", out)

        async def send() -> None:
            for i in range(0, len(payload), 1 << 16):
                writer.write(payload[i : i + (1 << 16)])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        got = await reader.read(-1)
        await sender
        writer.close()
        assert len(got) == len(payload)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        await asyncio.sleep(0.05)
        await env.aclose()

    run(main())
    inbound = [e for e in env.logs if e["direction"] == "inbound"]
    assert inbound[0]["bytes_recv"] == len(payload) and inbound[0]["bytes_sent"] == len(payload)
    assert "error" not in inbound[0]


def test_half_close_keeps_the_other_direction(env: Env) -> None:
    async def main() -> None:
        out, _ = await _tunnel(env, "count")
        reader, writer = await asyncio.open_connection("127.0.0.1", out)
        writer.write(b"a" * 123_457)
        writer.write_eof()  # our FIN reaches the app as EOF; its answer still comes back
        assert await reader.read() == b"123457"
        writer.close()
        await env.aclose()

    run(main())


def test_app_first_bytes_and_server_close(env: Env) -> None:
    """The app closes first (after its answer): the client sees the data, then EOF."""

    async def main() -> None:
        out, server = await _tunnel(env, "count")
        reader, writer = await asyncio.open_connection("127.0.0.1", out)
        writer.write_eof()
        assert await reader.read() == b"0"
        writer.close()
        await asyncio.sleep(0.05)
        assert not server.live
        await env.aclose()

    run(main())


def test_backpressure_bounds_buffering_and_loses_nothing(env: Env) -> None:
    """A reader that stalls must stall the writer through h2 flow control (4 MiB stream window),
    not make the proxies buffer without bound."""
    release = asyncio.Event()

    async def main() -> None:
        got = asyncio.get_running_loop().create_future()

        async def stalled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await release.wait()
            total = 0
            while data := await reader.read(1 << 18):
                total += len(data)
            got.set_result(total)
            writer.close()

        srv = await asyncio.start_server(stalled, "127.0.0.1", 0)
        app = srv.sockets[0].getsockname()[1]
        server = await env.server()
        out = await env.outbound(env.pool(), env.key(server), f"127.0.0.1:{app}")
        _reader, writer = await asyncio.open_connection("127.0.0.1", out)
        chunk = b"z" * (1 << 20)
        written = 0
        while written < 256 * (1 << 20):
            writer.write(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except TimeoutError:
                break
            written += len(chunk)
        # loopback socket buffers (4 sockets) + 4 MiB window + 400 KiB send queue + 1 MiB write
        # buffers: well under 64 MiB; without backpressure this would run to 256 MiB
        assert written < 64 * (1 << 20)
        release.set()
        writer.write_eof()
        await writer.drain()
        total = await asyncio.wait_for(got, 30)
        assert total >= written and total % len(chunk) == 0
        writer.close()
        srv.close()
        await env.aclose()

    run(main())


def test_app_reset_resets_the_tunnel(env: Env) -> None:
    async def main() -> None:
        out, server = await _tunnel(env, "hold")
        _reader, writer = await asyncio.open_connection("127.0.0.1", out)
        writer.write(b"x")
        await asyncio.sleep(0.1)
        assert len(server.live) == 1
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # linger 0: a real RST from the app client
        await asyncio.sleep(0.2)
        assert not server.live
        await env.aclose()

    run(main())
    inbound = [e for e in env.logs if e["direction"] == "inbound"]
    assert inbound[0]["error"].startswith("stream reset by peer")
