"""How the node proxy learns its pods: a small Unix-socket API, our version of ztunnel's ZDS.

istio-ambient.md §2.2: in Istio the CNI node agent hands ztunnel each pod's netns over a Unix socket
(`AddWorkload` + the fd, `DelWorkload`, acks). Here the local cluster runner (or any agent) does the
same with newline-delimited JSON on a stream socket, one request per line, one reply per line:

    {"op": "add", "uid": "ns/name", "netns": "/run/netns/<pod>", "ip": "10.244.1.2",
     "workload_api": "/run/zerotunnel/.../agent.sock"}        (workload_api optional)
        → {"ok": true[, "spiffe_endpoint_socket": "unix:///…"]} once the pod's listeners are open, its
          certificate is in hand, and its SPIFFE Workload API (when asked for) is listening
    {"op": "del", "uid": "ns/name"}        → {"ok": true, "removed": true|false}
    {"op": "list"}                         → {"ok": true, "pods": [{uid, ip, identity, ready, cert_expiry}]}

Errors → {"ok": false, "error": "<reason>"}. The socket is created 0600: only root may attach pods.
The netns is passed by path (not by fd) because the runner names every pod netns; the node opens it
once and keeps the fd (`NetnsHandle`), so a later rename or unlink does not matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from zerotunnel.node.proxy import NodeProxy

log = logging.getLogger("zerotunnel.podapi")

MAX_LINE = 64 * 1024


async def _handle(proxy: NodeProxy, request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    if op == "add":
        uid, netns, ip = request.get("uid"), request.get("netns"), request.get("ip")
        if not all(isinstance(v, str) and v for v in (uid, netns, ip)):
            return {"ok": False, "error": "add needs string fields uid, netns and ip"}
        assert isinstance(uid, str) and isinstance(netns, str) and isinstance(ip, str)
        socket_path = request.get("workload_api")
        if socket_path is not None and not (isinstance(socket_path, str) and socket_path.startswith("/")):
            return {"ok": False, "error": "workload_api must be an absolute socket path"}
        pod = await proxy.add_pod(uid, netns, ip, Path(socket_path) if socket_path else None)
        reply: dict[str, Any] = {"ok": True}
        if pod.workload_api is not None:
            reply["spiffe_endpoint_socket"] = pod.workload_api.endpoint
        return reply
    if op == "del":
        uid = request.get("uid")
        if not isinstance(uid, str):
            return {"ok": False, "error": "del needs a string field uid"}
        return {"ok": True, "removed": await proxy.remove_pod(uid)}
    if op == "list":
        certs = {s.identity: s.not_after for s in proxy.certs.status()}
        pods = [
            {
                "uid": uid,
                "ip": pod.ip,
                "identity": str(pod.identity),
                "ready": True,
                "cert_expiry": certs.get(str(pod.identity)),
            }
            for uid, pod in sorted(proxy.pods.items())
        ]
        return {"ok": True, "pods": pods}
    return {"ok": False, "error": f"unknown op {op!r}; accepted: add, del, list"}


async def _client(proxy: NodeProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("a request is a JSON object")
                reply = await _handle(proxy, request)
            except (ValueError, json.JSONDecodeError) as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            except Exception as exc:  # every failure is the caller's answer, never our crash
                log.warning("pod API request %s failed: %s", line[:200], exc)
                reply = {"ok": False, "error": str(exc)}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    except (ConnectionError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()


async def serve_pod_api(proxy: NodeProxy, path: Path) -> asyncio.Server:
    """Listen on `path` (replacing a stale socket from a previous run), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(lambda r, w: _client(proxy, r, w), path, limit=MAX_LINE)
    finally:
        os.umask(old_umask)
    return server


async def call(path: Path, request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Client side (the runner): one request, one reply."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=MAX_LINE), timeout)
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    if not line:
        return {"ok": False, "error": "node proxy closed the connection"}
    reply = json.loads(line)
    assert isinstance(reply, dict)
    return reply
