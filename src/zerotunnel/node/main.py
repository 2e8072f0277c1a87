"""`zerotunnel node`: wire the node proxy to its configuration, its CA and its endpoints, then run.

Two sources, one proxy:
- control-plane mode (`--control ADDR`, issue 6): the node holds no CA key. It enrols once with a join
  token (or reuses the node identity persisted in `--state-dir`), gets pod certificates over the CA API
  and its configuration as snapshots over the xDS-style stream; a snapshot that fails to apply is NACKed
  and the last good one stays; when the control plane is away, the cached snapshot and certificates keep
  serving while the stream reconnects with backoff;
- standalone mode (`-f PATH --ca-dir DIR`, issue 4): configuration from files (`FileConfigSource`, last
  good config kept), certificates from a local CA directory.
Pod addresses come from a JSON file the local cluster maintains (`--addresses`) in both modes. SIGTERM
drains gracefully: listeners stop, live connections get a grace period, then close.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from zerotunnel.config import Config
from zerotunnel.control.client import ConfigSubscription, GrpcCaClient, Snapshot, ensure_node_identity
from zerotunnel.control.watch import FileConfigSource
from zerotunnel.errors import InputError
from zerotunnel.node import admin
from zerotunnel.node.accesslog import AccessLog
from zerotunnel.node.addresses import follow_addresses, read_addresses
from zerotunnel.node.certs import CertificateManager, LocalCaClient
from zerotunnel.node.podapi import serve_pod_api
from zerotunnel.node.process import cancel_all, config_rejected, run_process, stop_on_signals
from zerotunnel.node.proxy import NodeProxy

log = logging.getLogger("zerotunnel.node")


@dataclass(frozen=True, slots=True)
class NodeOptions:
    node: str
    config_paths: tuple[Path, ...] = ()
    ca_dir: Path | None = None
    control: str | None = None
    join_token: str | None = None
    ca_root: Path | None = None
    state_dir: Path | None = None
    addresses: Path | None = None
    pod_api: Path | None = None
    admin: tuple[str, int] = ("127.0.0.1", 15000)
    metrics: tuple[str, int] = ("0.0.0.0", 15020)  # noqa: S104 - Prometheus scrapes from outside the node
    readiness: tuple[str, int] = ("0.0.0.0", 15021)  # noqa: S104 - probed from outside the node
    drain_seconds: float = 5.0
    max_setting_up: int = 512
    pods: tuple[tuple[str, str, str], ...] = field(default=())
    """(uid, netns, ip) to serve at start, for running without a pod API client."""



class NodeRunner:
    def __init__(self, options: NodeOptions) -> None:
        self.options = options
        self.stop = asyncio.Event()
        self.config: Config | None = None
        self.addresses = read_addresses(options.addresses)
        self.version = 0
        self.source: FileConfigSource | None = None
        self.ca_client: GrpcCaClient | None = None
        self.subscription: ConfigSubscription | None = None
        self.access = AccessLog(sink=lambda line: print(line, flush=True))
        self.certs: CertificateManager
        self.proxy: NodeProxy

    async def start(self) -> list[asyncio.Task[None]]:
        """Build the proxy from its source; return the background tasks that keep it current."""
        loop = asyncio.get_running_loop()
        options = self.options
        if options.control is None:
            if options.ca_dir is None or not options.config_paths:
                raise InputError("standalone mode needs -f PATH and --ca-dir DIR (or use --control ADDR)")
            self.source = FileConfigSource(options.config_paths)
            self.config = self.source.load().config
            mesh = self.config.mesh
            self.certs = CertificateManager(
                LocalCaClient(options.ca_dir),
                ttl=mesh.workload_cert_ttl,
                trust_domain_aliases=mesh.trust_domain_aliases,
            )
            self.proxy = NodeProxy(options.node, self.certs, access_log=self.access,
                                   max_setting_up=options.max_setting_up)
            self._apply()
            return [loop.create_task(self.source.watch(self._on_config, config_rejected, self.stop))]
        state_dir = options.state_dir or Path(f"/var/lib/zerotunnel/node-{options.node}")
        ca_root = options.ca_root.read_bytes() if options.ca_root is not None else None
        await ensure_node_identity(options.control, state_dir, token=options.join_token, ca_root_pem=ca_root)
        self.ca_client = GrpcCaClient(options.control, state_dir)
        self.certs = CertificateManager(self.ca_client)
        self.proxy = NodeProxy(options.node, self.certs, access_log=self.access,
                                   max_setting_up=options.max_setting_up)
        self.subscription = ConfigSubscription(self.ca_client, self._on_snapshot)
        return [
            loop.create_task(self.subscription.run(self.stop)),
            loop.create_task(self.ca_client.maintain(self.stop)),
        ]

    async def _on_snapshot(self, snapshot: Snapshot) -> None:
        self.config = snapshot.config
        self._apply()
        # A snapshot means the control plane answers: renewals that failed while it was away retry now.
        woken = self.certs.retry_failed_now()
        if woken:
            log.info("control plane reachable: retrying %d certificate renewal(s) now", woken)

    def _apply(self) -> None:
        if self.config is None:
            return  # addresses arrived before the first configuration
        self.certs.ttl = self.config.mesh.workload_cert_ttl
        self.version += 1
        self.proxy.apply(self.config, self.addresses, self.version)

    async def _on_config(self, config: Config, _version: int) -> None:
        self.config = config
        self._apply()

    async def _watch_addresses(self) -> None:
        async for addresses in follow_addresses(self.options.addresses, self.stop, lambda: self.addresses):
            self.addresses = addresses
            self._apply()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop_on_signals(self.stop)
        tasks = await self.start()
        tasks.append(loop.create_task(self._watch_addresses()))
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
        log.info("node proxy %s ready (config version %d)", self.options.node, self.version)
        await self.stop.wait()
        log.info("draining (up to %.0fs)", self.options.drain_seconds)
        for server in servers:
            server.close()
        await self.proxy.close(self.options.drain_seconds)
        if self.ca_client is not None:
            await self.ca_client.close()
        await cancel_all(tasks)


def run(options: NodeOptions) -> None:
    async def main() -> None:
        await NodeRunner(options).run()

    run_process(main)
