"""`zerotunnel waypoint`: wire a waypoint to its configuration, its CA and its addresses, then run.

Like the node proxy (node/main.py): configuration from files (last good config kept, reloaded on
change), addresses from the runner's JSON file (watched), the certificate of the waypoint's own
identity from the local CA (refreshed at half-life, swapped into the listener in place). JWKS for
RequestAuthentication `jwksUri` rules are fetched here (the policy engine is pure, §6.2) and refreshed
with each configuration. SIGTERM drains (security.md rule 19).
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from zerotunnel.config import Config
from zerotunnel.control.watch import FileConfigSource
from zerotunnel.errors import InputError
from zerotunnel.mesh.build import Addresses
from zerotunnel.mesh.model import WaypointRef
from zerotunnel.node import admin
from zerotunnel.node.accesslog import AccessLog
from zerotunnel.node.addresses import follow_addresses, read_addresses
from zerotunnel.node.certs import CertificateError, CertificateManager, LocalCaClient
from zerotunnel.node.process import (
    cancel_all,
    config_rejected,
    parse_namespaced_name,
    run_process,
    stop_on_signals,
)
from zerotunnel.waypoint.proxy import Waypoint, waypoint_identity
from zerotunnel.waypoint.telemetry import RequestTelemetry

log = logging.getLogger("zerotunnel.waypoint")
JWKS_TIMEOUT = 5.0
MAX_JWKS_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class WaypointOptions:
    gateway: WaypointRef
    config_paths: tuple[Path, ...]
    ca_dir: Path
    addresses: Path | None = None
    listen: tuple[str, int] = ("0.0.0.0", 15008)  # noqa: S104 - the HBONE listener serves the network
    metrics: tuple[str, int] | None = ("0.0.0.0", 15020)  # noqa: S104 - Prometheus scrapes from outside
    readiness: tuple[str, int] | None = ("0.0.0.0", 15021)  # noqa: S104 - probed from outside
    drain_seconds: float = 5.0
    handshake_timeout: float = 10.0
    max_connections: int = 4096
    max_pending_handshakes: int = 256


def parse_gateway(value: str) -> WaypointRef:
    return WaypointRef(*parse_namespaced_name(value, flag="--gateway"))


def jwks_uris(config: Config) -> set[str]:
    return {
        r.jwks_uri
        for ra in config.request_authentications
        for r in ra.jwt_rules
        if r.jwks_uri and r.jwks is None
    }


def _fetch(uri: str) -> str:
    if not uri.startswith(("https://", "http://")):
        raise ValueError(f"unsupported jwksUri scheme: {uri}")
    with urllib.request.urlopen(uri, timeout=JWKS_TIMEOUT) as response:  # noqa: S310 - scheme checked above
        return bytes(response.read(MAX_JWKS_BYTES)).decode()


async def fetch_jwks(uris: set[str], previous: dict[str, str]) -> dict[str, str]:
    """Fetch each `jwksUri`; a failed fetch keeps the previous keys (tokens then fail closed: 401)."""
    out: dict[str, str] = {}
    for uri in sorted(uris):
        try:
            out[uri] = await asyncio.to_thread(_fetch, uri)
        except (OSError, ValueError) as exc:
            log.warning("cannot fetch jwksUri %s: %s", uri, exc)
            if uri in previous:
                out[uri] = previous[uri]
    return out


class WaypointRunner:
    def __init__(self, options: WaypointOptions) -> None:
        self.options = options
        if not options.ca_dir.is_dir():
            raise InputError(f"--ca-dir {options.ca_dir}: no such CA directory")
        self.source = FileConfigSource(options.config_paths)
        self.stop = asyncio.Event()
        loaded = self.source.load()
        self.config: Config = loaded.config
        self.addresses: Addresses = read_addresses(options.addresses)
        self.version = 0
        mesh = self.config.mesh
        self.certs = CertificateManager(
            LocalCaClient(options.ca_dir),
            ttl=mesh.workload_cert_ttl,
            trust_domain_aliases=mesh.trust_domain_aliases,
        )
        self.telemetry = RequestTelemetry("waypoint", sink=lambda line: print(line, flush=True))
        self.waypoint: Waypoint | None = None
        self.jwks: dict[str, str] = {}

    async def _apply(self) -> None:
        assert self.waypoint is not None
        self.version += 1
        self.jwks = await fetch_jwks(jwks_uris(self.config), self.jwks)
        self.waypoint.jwks_by_uri = self.jwks
        self.waypoint.apply(self.config, self.addresses, self.version)
        log.info("waypoint %s: configuration version %d applied", self.options.gateway, self.version)

    async def _on_config(self, config: Config, _version: int) -> None:
        self.config = config
        await self._apply()

    async def _watch_addresses(self) -> None:
        async for addresses in follow_addresses(self.options.addresses, self.stop, lambda: self.addresses):
            self.addresses = addresses
            await self._apply()

    def _metrics(self, _method: str, path: str) -> admin.Response:
        if path not in ("/metrics", "/stats/prometheus"):
            return 404, "text/plain", b"not found\n"
        assert self.waypoint is not None
        body = self.telemetry.render() + self.waypoint.metrics.render()
        return 200, "text/plain; version=0.0.4", body

    def _ready(self, _method: str, path: str) -> admin.Response:
        if path != "/healthz/ready":
            return 404, "text/plain", b"not found\n"
        return (
            (200, "text/plain", b"ready\n")
            if self.waypoint is not None
            else (503, "text/plain", b"not ready\n")
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop_on_signals(self.stop)
        identity = waypoint_identity(self.config, self.options.gateway)
        try:
            credentials = await self.certs.acquire(identity)
        except CertificateError as exc:
            raise InputError(f"cannot obtain a certificate for {identity}: {exc.message}") from None
        access = AccessLog(sink=lambda line: print(line, flush=True))
        self.waypoint = Waypoint(
            self.options.gateway,
            credentials,
            telemetry=self.telemetry,
            access_log=access,
            handshake_timeout=self.options.handshake_timeout,
            max_connections=self.options.max_connections,
            max_pending_handshakes=self.options.max_pending_handshakes,
        )
        self.certs.on_update(self.waypoint.update_credentials)
        await self._apply()
        await self.waypoint.start(*self.options.listen)
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
            "waypoint %s (%s) listening on %s:%d", self.options.gateway, identity, *self.waypoint.address
        )
        await self.stop.wait()
        for server in servers:
            server.close()
        await self.waypoint.close(self.options.drain_seconds)
        await self.certs.close()
        await cancel_all(tasks)


def run(options: WaypointOptions) -> None:
    async def main() -> None:
        await WaypointRunner(options).run()

    run_process(main)
