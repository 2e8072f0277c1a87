"""`zerotunnel node`: wire the node proxy to its configuration, its CA and its endpoints, then run.

Standalone mode (issue 4): configuration from files (`FileConfigSource`, last good config kept), pod
addresses from a JSON file the local cluster maintains, certificates from a local CA directory. SIGTERM
drains gracefully: listeners stop, live connections get a grace period, then close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import watchfiles

from zerotunnel.config import Config
from zerotunnel.config.model import FrozenMap
from zerotunnel.control.watch import FileConfigSource
from zerotunnel.errors import InputError
from zerotunnel.mesh.build import Addresses
from zerotunnel.node import admin
from zerotunnel.node.accesslog import AccessLog
from zerotunnel.node.certs import CertificateManager, LocalCaClient
from zerotunnel.node.podapi import serve_pod_api
from zerotunnel.node.proxy import NodeProxy

log = logging.getLogger("zerotunnel.node")


@dataclass(frozen=True, slots=True)
class NodeOptions:
    node: str
    config_paths: tuple[Path, ...]
    ca_dir: Path
    addresses: Path | None = None
    pod_api: Path | None = None
    admin: tuple[str, int] = ("127.0.0.1", 15000)
    metrics: tuple[str, int] = ("0.0.0.0", 15020)  # noqa: S104 - Prometheus scrapes from outside the node
    readiness: tuple[str, int] = ("0.0.0.0", 15021)  # noqa: S104 - probed from outside the node
    drain_seconds: float = 5.0
    pods: tuple[tuple[str, str, str], ...] = field(default=())
    """(uid, netns, ip) to serve at start, for running without a pod API client."""


def read_addresses(path: Path | None) -> Addresses:
    """The runner's address file: {"pod_ips": {"ns/name": ip}, "service_vips": {"ns/name": vip}}."""
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


class NodeRunner:
    def __init__(self, options: NodeOptions) -> None:
        self.options = options
        self.source = FileConfigSource(options.config_paths)
        self.stop = asyncio.Event()
        self.config: Config | None = None
        self.addresses = Addresses()
        self.version = 0
        access = AccessLog(sink=lambda line: print(line, flush=True))
        loaded = self.source.load()
        self.config = loaded.config
        mesh = loaded.config.mesh
        self.certs = CertificateManager(
            LocalCaClient(options.ca_dir),
            ttl=mesh.workload_cert_ttl,
            trust_domain_aliases=mesh.trust_domain_aliases,
        )
        self.proxy = NodeProxy(options.node, self.certs, access_log=access)
        self.addresses = read_addresses(options.addresses)
        self._apply()

    def _apply(self) -> None:
        assert self.config is not None
        self.version += 1
        self.proxy.apply(self.config, self.addresses, self.version)

    async def _on_config(self, config: Config, _version: int) -> None:
        self.config = config
        self._apply()

    async def _on_error(self, error: InputError) -> None:
        log.error("configuration change rejected; the last good configuration stays in force: %s", error)

    async def _watch_addresses(self) -> None:
        path = self.options.addresses
        if path is None:
            return
        async for _ in watchfiles.awatch(
            path.parent,
            stop_event=self.stop,
            debounce=100,
            step=20,
            watch_filter=lambda _c, p: Path(p).name == path.name,
        ):
            try:
                addresses = read_addresses(path)
            except InputError as exc:
                log.error("%s; keeping the previous addresses", exc)
                continue
            if addresses != self.addresses:
                self.addresses = addresses
                self._apply()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        endpoints = admin.AdminEndpoints(self.proxy, self.stop.set)
        servers = [
            await admin.serve(endpoints.admin, *self.options.admin),
            await admin.serve(endpoints.metrics, *self.options.metrics),
            await admin.serve(endpoints.readiness, *self.options.readiness),
        ]
        if self.options.pod_api is not None:
            servers.append(await serve_pod_api(self.proxy, self.options.pod_api))
        for uid, netns, ip in self.options.pods:
            await self.proxy.add_pod(uid, netns, ip)
        tasks = [
            loop.create_task(self.source.watch(self._on_config, self._on_error, self.stop)),
            loop.create_task(self._watch_addresses()),
        ]
        log.info("node proxy %s ready (config version %d)", self.options.node, self.version)
        await self.stop.wait()
        log.info("draining (up to %.0fs)", self.options.drain_seconds)
        for server in servers:
            server.close()
        await self.proxy.close(self.options.drain_seconds)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


def run(options: NodeOptions) -> None:
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    async def main() -> None:
        await NodeRunner(options).run()

    try:
        import uvloop
    except ImportError:  # uvloop is optional (DESIGN.md §5)
        asyncio.run(main())
    else:
        uvloop.run(main())
