"""`zerotunnel gateway`: wire the ingress gateway to its configuration, CA and addresses, then run.

As the node proxy and the waypoint: configuration from files (reloaded on change; a bad Secret keeps
the last good TLS configuration of its server, issue 7 "Certificates and secrets reload without a
restart"), addresses from the runner's JSON file, the gateway's own mesh certificate from the local
CA (refreshed at half-life). SIGTERM stops accepting and closes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from zerotunnel.config import Config
from zerotunnel.control.watch import FileConfigSource
from zerotunnel.errors import InputError
from zerotunnel.gateway.config import gateway_identity, selected_gateways
from zerotunnel.gateway.server import (
    HANDSHAKE_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_PENDING_HANDSHAKES,
    IngressGateway,
)
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.mesh.build import Addresses
from zerotunnel.node import admin
from zerotunnel.node.addresses import follow_addresses, read_addresses
from zerotunnel.node.certs import CertificateError, CertificateManager, LocalCaClient
from zerotunnel.node.process import (
    cancel_all,
    config_rejected,
    parse_namespaced_name,
    run_process,
    stop_on_signals,
)
from zerotunnel.waypoint.telemetry import RequestTelemetry

log = logging.getLogger("zerotunnel.gateway")


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    config_paths: tuple[Path, ...]
    ca_dir: Path
    gateway: str | None = None
    addresses: Path | None = None
    listen_host: str = "0.0.0.0"  # noqa: S104 - the ingress gateway serves outside clients
    metrics: tuple[str, int] | None = ("0.0.0.0", 15020)  # noqa: S104 - Prometheus scrapes from outside
    readiness: tuple[str, int] | None = ("0.0.0.0", 15021)  # noqa: S104 - probed from outside
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    max_pending_handshakes: int = MAX_PENDING_HANDSHAKES


def parse_gateway(value: str | None) -> str | None:
    if value is None:
        return None
    parse_namespaced_name(value, flag="--gateway")
    return value


def identity_for(config: Config, gateway: str | None) -> SpiffeId:
    gateways = selected_gateways(config, gateway)
    if not gateways:
        which = f"Gateway {gateway}" if gateway else "networking.istio.io Gateway"
        raise InputError(f"the configuration has no {which}")
    return SpiffeId.parse(gateway_identity(config, gateways[0]))


class GatewayRunner:
    def __init__(self, options: GatewayOptions) -> None:
        self.options = options
        if not options.ca_dir.is_dir():
            raise InputError(f"--ca-dir {options.ca_dir}: no such CA directory")
        self.source = FileConfigSource(options.config_paths)
        self.stop = asyncio.Event()
        self.config: Config = self.source.load().config
        self.addresses: Addresses = read_addresses(options.addresses)
        self.identity = identity_for(self.config, options.gateway)
        mesh = self.config.mesh
        self.certs = CertificateManager(
            LocalCaClient(options.ca_dir),
            ttl=mesh.workload_cert_ttl,
            trust_domain_aliases=mesh.trust_domain_aliases,
        )
        self.telemetry = RequestTelemetry("source", sink=lambda line: print(line, flush=True))
        self.gateway: IngressGateway | None = None

    async def _apply(self) -> None:
        assert self.gateway is not None
        errors = self.gateway.apply(self.config, self.addresses)
        await self.gateway.start()
        log.info(
            "gateway configuration applied (%d server port(s), %d error(s))",
            len(self.gateway.ports),
            len(errors),
        )

    async def _on_config(self, config: Config, _version: int) -> None:
        self.config = config
        await self._apply()

    async def _watch_addresses(self) -> None:
        async for addresses in follow_addresses(self.options.addresses, self.stop, lambda: self.addresses):
            self.addresses = addresses
            await self._apply()

    def _metrics(self, _method: str, path: str) -> admin.Response:
        if path not in ("/metrics", "/stats/prometheus") or self.gateway is None:
            return 404, "text/plain", b"not found\n"
        return 200, "text/plain; version=0.0.4", self.telemetry.render() + self.gateway.metrics.render()

    def _ready(self, _method: str, path: str) -> admin.Response:
        if path != "/healthz/ready":
            return 404, "text/plain", b"not found\n"
        ready = self.gateway is not None and bool(self.gateway.servers)
        return (200, "text/plain", b"ready\n") if ready else (503, "text/plain", b"not ready\n")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop_on_signals(self.stop)
        try:
            credentials = await self.certs.acquire(self.identity)
        except CertificateError as exc:
            raise InputError(f"cannot obtain a certificate for {self.identity}: {exc.message}") from None
        self.gateway = IngressGateway(
            credentials,
            gateway=self.options.gateway,
            listen_host=self.options.listen_host,
            telemetry=self.telemetry,
            handshake_timeout=self.options.handshake_timeout,
            max_connections=self.options.max_connections,
            max_pending_handshakes=self.options.max_pending_handshakes,
        )
        self.certs.on_update(self.gateway.update_credentials)
        await self._apply()
        servers = []
        if self.options.metrics is not None:
            servers.append(await admin.serve(self._metrics, *self.options.metrics))
        if self.options.readiness is not None:
            servers.append(await admin.serve(self._ready, *self.options.readiness))
        tasks = [
            loop.create_task(self.source.watch(self._on_config, config_rejected, self.stop)),
            loop.create_task(self._watch_addresses()),
        ]
        log.info(
            "ingress gateway (%s) ready on ports %s",
            self.identity,
            ", ".join(str(p) for p in sorted(self.gateway.servers)),
        )
        await self.stop.wait()
        for server in servers:
            server.close()
        await self.gateway.close()
        await self.certs.close()
        await cancel_all(tasks)


def run(options: GatewayOptions) -> None:
    async def main() -> None:
        await GatewayRunner(options).run()

    # Not uvloop: its TLS transport reports some refused client handshakes as a bare connection
    # reset, losing the reason the operator needs (unknown CA, expired); asyncio's reports them all.
    run_process(main, use_uvloop=False)
