"""A loopback mesh for the waypoint tests: mesh CA, the seed's namespaces, app-a behind a waypoint.

Real pieces only: the destination "node proxy" is an `HboneServer` on `<app-a IP>:15008` in front of
the demo app, the waypoint is `Waypoint` on `<waypoint IP>:15008`, clients are `HbonePool`s holding
app-b's and app-c's SVIDs. Each test session picks its own 127.x.y.0/24 so that parallel runs (other
helpers' tests) never collide on port 15008.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from zerotunnel.config import Config, load
from zerotunnel.demoapp import DemoAppServer, start_demo_app
from zerotunnel.identity.bundle import TrustBundle
from zerotunnel.identity.ca import CertificateAuthority
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.mesh.build import Addresses
from zerotunnel.mesh.model import WaypointRef
from zerotunnel.node.accesslog import AccessLog
from zerotunnel.node.hbone_client import HbonePool, PoolKey
from zerotunnel.node.hbone_server import HboneServer, InboundRequest, LocalWorkload
from zerotunnel.node.tls import WorkloadCredentials
from zerotunnel.policy.decision import Decision
from zerotunnel.waypoint.http import HttpResponse, StreamChannel, exchange
from zerotunnel.waypoint.proxy import Waypoint, waypoint_identity
from zerotunnel.waypoint.telemetry import RequestTelemetry

TD = "cluster.local"
NOW = datetime.now(UTC)
# The seed scenario without its waypoint label (a copy of examples/seed/mesh.yaml before it gained one),
# so these tests bind the waypoint themselves and do not change when the shipped example does.
SEED = Path(__file__).resolve().parent / "data" / "seed-mesh.yaml"
VIP = "10.96.0.10"

WAYPOINT_YAML = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: namespace-a}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-0
  namespace: namespace-a
  labels: {gateway.networking.k8s.io/gateway-name: waypoint}
spec:
  serviceAccountName: waypoint
  nodeName: node-1
  containers: [{name: waypoint, command: [zerotunnel, waypoint]}]
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: waypoint, namespace: namespace-a}
"""


def seed_with_waypoint(extra: str = "", *, waypoint_for: str = "service") -> Config:
    """The seed mesh, namespace-a bound to its waypoint (taking `waypoint_for` traffic), plus `extra`."""
    text = SEED.read_text().replace(
        "  name: namespace-a\n  labels:\n    istio.io/dataplane-mode: ambient\n",
        "  name: namespace-a\n  labels:\n    istio.io/dataplane-mode: ambient\n"
        "    istio.io/use-waypoint: waypoint\n",
    )
    assert "use-waypoint" in text
    waypoint = WAYPOINT_YAML.replace(
        "metadata: {name: waypoint, namespace: namespace-a}\nspec:\n  gatewayClassName",
        "metadata: {name: waypoint, namespace: namespace-a, "
        f"labels: {{istio.io/waypoint-for: {waypoint_for}}}}}\nspec:\n  gatewayClassName",
    )
    assert "waypoint-for" in waypoint
    return load([("mesh.yaml", text), ("waypoint.yaml", waypoint), ("extra.yaml", extra)])


@dataclass
class Pki:
    ca: CertificateAuthority
    bundle: TrustBundle

    def creds(self, ns: str, sa: str) -> WorkloadCredentials:
        ident = SpiffeId.istio(TD, ns, sa)
        chain, key = self.ca.issue_with_key(ident, NOW - timedelta(minutes=1), timedelta(hours=2))
        return WorkloadCredentials.from_pem(ident, chain.chain_pem, key, self.bundle)


@pytest.fixture(scope="session")
def pki() -> Pki:
    root = CertificateAuthority.create_root(TD, NOW - timedelta(days=1))
    inter = CertificateAuthority.create_intermediate(root, NOW - timedelta(days=1))
    return Pki(inter, TrustBundle.from_certs(TD, root.roots))


def _subnet() -> str:
    return f"127.{random.randint(100, 250)}.{random.randint(1, 250)}"


ALLOW = Decision(True, None, None, "allowed", 200)


@dataclass
class Mesh:
    """The running loopback mesh; `seen` holds every CONNECT the destination node proxy accepted."""

    pki: Pki
    config: Config
    addresses: Addresses
    waypoint: Waypoint
    destination: HboneServer
    log_lines: list[str]
    app: DemoAppServer
    seen: list[InboundRequest] = field(default_factory=list)
    """CONNECTs the destination accepted (upstream connections are kept alive: not one per request)."""
    app_requests: list[str] = field(default_factory=list)
    """Request lines the demo app served: what actually got through."""
    pools: dict[str, HbonePool] = field(default_factory=dict)

    @property
    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_lines]

    def pool(self, ns: str, sa: str) -> HbonePool:
        key = f"{ns}/{sa}"
        if key not in self.pools:
            creds = self.pki.creds(ns, sa)
            self.pools[key] = HbonePool(lambda _i: creds, mark=False)
        return self.pools[key]

    async def open(
        self, ns: str = "namespace-b", sa: str = "service-account-b", authority: str = f"{VIP}:80"
    ) -> StreamChannel:
        """An HBONE tunnel from `ns/sa` to the waypoint, as a source node proxy opens it."""
        pool = self.pool(ns, sa)
        key = PoolKey(SpiffeId.istio(TD, ns, sa), frozenset({self.waypoint.identity}), self.waypoint.address)
        return StreamChannel(await pool.connect(key, authority))

    async def request(
        self,
        method: str = "GET",
        path: str = "/data",
        *,
        ns: str = "namespace-b",
        sa: str = "service-account-b",
        host: str = "app-a.namespace-a.svc.cluster.local",
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> HttpResponse:
        channel = await self.open(ns, sa)
        try:
            return await exchange(channel, method, path, host, headers or [], body, timeout=10)
        finally:
            channel.send_eof()

    def apply(self, config: Config) -> None:
        self.config = config
        self.waypoint.apply(config, self.addresses, 2)

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()
        await self.waypoint.close(0)
        await self.destination.close(0)
        await self.app.close()


async def start_mesh(
    pki: Pki, config: Config, *, jwks: dict[str, str] | None = None, vips: dict[str, str] | None = None
) -> Mesh:
    net = _subnet()
    app_ip, wp_ip = f"{net}.2", f"{net}.3"
    addresses = Addresses(
        pod_ips={
            "namespace-a/app-a": app_ip,
            "namespace-b/app-b": f"{net}.4",
            "namespace-c/app-c": f"{net}.5",
            "namespace-a/waypoint-0": wp_ip,
        },
        service_vips={"namespace-a/app-a": VIP, **(vips or {})},
    )
    app_requests: list[str] = []
    app = await start_demo_app(app_ip, 8080, "app-a", log=app_requests.append)
    seen: list[InboundRequest] = []

    def authorize(request: InboundRequest) -> Decision:
        seen.append(request)
        return ALLOW

    dest_creds = pki.creds("namespace-a", "service-account-a")
    destination = HboneServer(
        dest_creds,
        authorize=authorize,
        local_workload=lambda ip: (
            LocalWorkload("app-a", "namespace-a", dest_creds.identity) if ip == app_ip else None
        ),
    )
    await destination.start(app_ip, 15008)
    ref = WaypointRef("namespace-a", "waypoint")
    ident = waypoint_identity(config, ref)
    wp_creds = pki.creds(ident.path.split("/")[2], ident.path.split("/")[4])
    lines: list[str] = []
    waypoint = Waypoint(
        ref,
        wp_creds,
        telemetry=RequestTelemetry("waypoint", sink=lines.append),
        access_log=AccessLog(lambda _line: None),
        jwks_by_uri=jwks,
        mark=False,
    )
    waypoint.pool.mark = False
    waypoint.apply(config, addresses, 1)
    await waypoint.start(wp_ip, 15008)
    return Mesh(pki, config, addresses, waypoint, destination, lines, app, seen, app_requests)


@pytest_asyncio.fixture
async def mesh(pki: Pki) -> AsyncIterator[Mesh]:
    m = await start_mesh(pki, seed_with_waypoint(SEED_POLICY))
    yield m
    await m.close()


SEED_POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: app-a-allow-get-data, namespace: namespace-a}
spec:
  targetRefs: [{kind: Service, group: "", name: app-a}]
  action: ALLOW
  rules:
    - from: [{source: {principals: [cluster.local/ns/namespace-b/sa/service-account-b]}}]
      to: [{operation: {methods: [GET], paths: [/data]}}]
"""
