"""Client of a node proxy's pod API: newline-delimited JSON over its Unix socket.

The runner plays the part of Istio's CNI agent (spec istio-ambient.md §2.2): it tells the node proxy
which pod netns to serve (`add`, answered only once the pod's listeners are open and its certificate
is in hand), forgets pods (`del`) and asks what is served (`list`, for `zerotunnel status`). One
request per connection keeps the client trivial and a stuck request from blocking the next.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

from zerotunnel.errors import ZerotunnelError

ADD_TIMEOUT = 20.0
_LIMIT = 4 * 1024 * 1024


class PodApiError(ZerotunnelError):
    """The node proxy refused a request, or could not be reached."""


def _decode(raw: bytes, sock_path: Path) -> dict[str, Any]:
    try:
        reply = json.loads(raw)
    except ValueError as exc:
        raise PodApiError(f"pod API {sock_path}: not JSON: {raw[:200]!r}") from exc
    if not isinstance(reply, dict):
        raise PodApiError(f"pod API {sock_path}: expected an object, got {reply!r}")
    return reply


def _checked(reply: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    if reply.get("ok") is not True:
        raise PodApiError(f"node proxy refused {request.get('op')} {request.get('uid', '')}: "
                          f"{reply.get('error', 'no reason given')}".replace("  ", " "))
    return reply


async def request(sock_path: Path, req: dict[str, Any], timeout: float = ADD_TIMEOUT) -> dict[str, Any]:
    """Send one request and return the `{"ok": true, ...}` reply; PodApiError otherwise."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(sock_path), limit=_LIMIT)
            try:
                writer.write(json.dumps(req).encode() + b"\n")
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
    except TimeoutError as exc:
        raise PodApiError(f"pod API {sock_path}: no answer to {req.get('op')} in {timeout:.0f} s") from exc
    except OSError as exc:
        raise PodApiError(f"pod API {sock_path}: {exc.strerror or exc}") from exc
    if not line:
        raise PodApiError(f"pod API {sock_path}: connection closed without an answer")
    return _checked(_decode(line, sock_path), req)


def request_sync(sock_path: Path, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """`request` for callers without an event loop (`zerotunnel status`)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(sock_path))
            sock.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except OSError as exc:
        raise PodApiError(f"pod API {sock_path}: {exc.strerror or exc}") from exc
    if not buf:
        raise PodApiError(f"pod API {sock_path}: connection closed without an answer")
    return _checked(_decode(buf, sock_path), req)
