"""The pod and service address file the local cluster maintains, as the node proxy, the waypoint and the
gateway read it.

The YAML a user applies carries no pod IPs (Kubernetes assigns them); the local cluster assigns them and
writes `{"pod_ips": {"ns/name": ip}, "service_vips": {"ns/name": vip}}` atomically (temp file + rename).
Every process that routes follows the file: a change is applied whole, a broken file keeps the previous
addresses in force (as a broken config does).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import watchfiles

from zerotunnel.config.model import FrozenMap
from zerotunnel.errors import InputError
from zerotunnel.mesh.build import Addresses

log = logging.getLogger("zerotunnel.addresses")


def read_addresses(path: Path | None) -> Addresses:
    """The address file, or no addresses when there is none; InputError says what is wrong with it."""
    if path is None:
        return Addresses()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"addresses file {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"addresses file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"addresses file {path}: expected a JSON object")
    pod_ips, vips = data.get("pod_ips", {}), data.get("service_vips", {})
    if not isinstance(pod_ips, dict) or not isinstance(vips, dict):
        raise InputError(f"addresses file {path}: pod_ips and service_vips must be objects")
    return Addresses(
        FrozenMap({str(k): str(v) for k, v in pod_ips.items()}),
        FrozenMap({str(k): str(v) for k, v in vips.items()}),
    )


async def follow_addresses(
    path: Path | None, stop: asyncio.Event, current: Callable[[], Addresses]
) -> AsyncIterator[Addresses]:
    """Yield the addresses each time the file changes to something new and valid, until `stop`."""
    if path is None:
        return
    async for _ in watchfiles.awatch(
        path.parent,
        stop_event=stop,
        debounce=100,
        step=20,
        watch_filter=lambda _c, p: Path(p).name == path.name,
    ):
        try:
            addresses = read_addresses(path)
        except InputError as exc:
            log.error("%s; keeping the previous addresses", exc)
            continue
        if addresses != current():
            yield addresses
