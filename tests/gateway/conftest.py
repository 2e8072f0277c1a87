"""External PKI and a loopback mesh for the ingress gateway tests.

Two external CAs ("partner-a", "partner-b") issue client certificates; a third ("stranger") is trusted
by no one; a server CA issues the gateway's `app.example.com` certificate. Everything is built with
`cryptography` and handed to the gateway as Kubernetes Secrets, as `kubectl create secret` would.
Clients are the real `curl` binary. The mesh side is the waypoint tests' loopback mesh (demo app behind
an HBONE server on `<app IP>:15008`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.waypoint.conftest import TD, VIP, Pki, pki, seed_with_waypoint
from zerotunnel.config import Config, load
from zerotunnel.demoapp import DemoAppServer, start_demo_app
from zerotunnel.gateway.server import IngressGateway
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.mesh.build import Addresses
from zerotunnel.mesh.model import WaypointRef
from zerotunnel.node.accesslog import AccessLog
from zerotunnel.node.hbone_server import HboneServer, InboundRequest, LocalWorkload
from zerotunnel.policy.decision import Decision
from zerotunnel.waypoint.proxy import Waypoint
from zerotunnel.waypoint.telemetry import RequestTelemetry

__all__ = ["pki"]  # the mesh CA fixture, shared with the waypoint tests

NOW = datetime.now(UTC)
HOST = "app.example.com"
GATEWAY_SA = "istio-ingressgateway-service-account"


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        key.chmod(0o600)
        return cert, key


def make_ca(name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} root CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(
    ca: Issued,
    cn: str,
    *,
    dns: tuple[str, ...] = (),
    uri: tuple[str, ...] = (),
    server: bool = False,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns] + [
        x509.UniformResourceIdentifier(u) for u in uri
    ]
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "clients"),
                    x509.NameAttribute(NameOID.COMMON_NAME, cn),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - timedelta(hours=1))
        .not_valid_after(not_after or NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def make_crl(ca: Issued, revoked: list[x509.Certificate]) -> bytes:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(NOW - timedelta(hours=1))
        .next_update(NOW + timedelta(days=7))
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(NOW - timedelta(minutes=30))
            .build()
        )
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@dataclass
class ExternalPki:
    server_ca: Issued
    partner_a: Issued
    partner_b: Issued
    stranger: Issued
    server: Issued
    client_a: Issued
    client_b: Issued
    client_unknown: Issued
    client_revoked: Issued
    client_expired: Issued
    client_wrong_san: Issued

    def crl(self) -> bytes:
        return make_crl(self.partner_a, [self.client_revoked.cert])


@pytest.fixture(scope="session")
def ext() -> ExternalPki:
    server_ca, a, b, stranger = (
        make_ca("server-ca"),
        make_ca("partner-a"),
        make_ca("partner-b"),
        make_ca("stranger"),
    )
    return ExternalPki(
        server_ca,
        a,
        b,
        stranger,
        server=issue(server_ca, HOST, dns=(HOST,), server=True),
        client_a=issue(
            a, "client-a", dns=("client-a.partner-a.example",), uri=("https://client-a.partner-a.example",)
        ),
        client_b=issue(b, "client-b", dns=("client-b.partner-b.example",)),
        client_unknown=issue(stranger, "intruder", dns=("client-a.partner-a.example",)),
        client_revoked=issue(a, "revoked", dns=("revoked.partner-a.example",)),
        client_expired=issue(
            b,
            "expired",
            dns=("client-b.partner-b.example",),
            not_before=NOW - timedelta(days=10),
            not_after=NOW - timedelta(days=1),
        ),
        client_wrong_san=issue(a, "other", dns=("other.partner-a.example",)),
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def gateway_yaml(
    ext: ExternalPki,
    mutual_port: int,
    optional_port: int,
    *,
    ca_bundle: bytes | None = None,
    sans: tuple[str, ...] = (),
) -> str:
    """Gateway with a MUTUAL and an OPTIONAL_MUTUAL server, the Secret, and a VirtualService to app-a."""
    bundle = ca_bundle if ca_bundle is not None else ext.partner_a.cert_pem + ext.partner_b.cert_pem
    san_line = f"\n      subjectAltNames: {json.dumps(list(sans))}" if sans else ""
    return f"""
apiVersion: v1
kind: Namespace
metadata: {{name: istio-system}}
---
apiVersion: v1
kind: Secret
metadata: {{name: app-credential, namespace: istio-system}}
type: kubernetes.io/tls
data:
  tls.crt: {b64(ext.server.cert_pem)}
  tls.key: {b64(ext.server.key_pem)}
  ca.crt: {b64(bundle)}
  ca.crl: {b64(ext.crl())}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: ingress, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - name: mutual
    port: {{number: {mutual_port}, name: https-mutual, protocol: HTTPS}}
    hosts: [{HOST}]
    tls:
      mode: MUTUAL
      credentialName: app-credential
      minProtocolVersion: TLSV1_2{san_line}
  - name: optional
    port: {{number: {optional_port}, name: https-optional, protocol: HTTPS}}
    hosts: [{HOST}]
    tls:
      mode: OPTIONAL_MUTUAL
      credentialName: app-credential
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app, namespace: istio-system}}
spec:
  hosts: [{HOST}]
  gateways: [istio-system/ingress]
  http:
  - name: to-app-a
    match: [{{uri: {{prefix: /}}}}]
    route: [{{destination: {{host: app-a.namespace-a.svc.cluster.local, port: {{number: 80}}}}}}]
"""


ALLOW = Decision(True, None, None, "allowed", 200)


@dataclass
class GatewayMesh:
    ext: ExternalPki
    gateway: IngressGateway
    destination: HboneServer
    app: DemoAppServer
    lines: list[str]
    addresses: Addresses
    mutual_port: int
    optional_port: int
    tmp: Path
    seen: list[InboundRequest] = field(default_factory=list)
    waypoint: Waypoint | None = None
    waypoint_lines: list[str] = field(default_factory=list)

    @property
    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    async def curl(
        self,
        client: Issued | None,
        *,
        port: int | None = None,
        path: str = "/data",
        headers: tuple[str, ...] = (),
    ) -> tuple[int, str, str]:
        """Run curl; returns (exit code, stdout body, stderr)."""
        port = port or self.mutual_port
        args = [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(self.tmp / "server-ca.crt"),
            "--resolve",
            f"{HOST}:{port}:127.0.0.1",
        ]
        if client is not None:
            cert, key = client.write(self.tmp, f"client-{id(client)}")
            args += ["--cert", str(cert), "--key", str(key)]
        for h in headers:
            args += ["-H", h]
        args.append(f"https://{HOST}:{port}{path}")
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def close(self) -> None:
        await self.gateway.close()
        if self.waypoint is not None:
            await self.waypoint.close(0)
        await self.destination.close(0)
        await self.app.close()


def _ports() -> tuple[int, int]:
    base = random.randint(10000, 30000)
    return base, base + 1


def mesh_config(
    ext: ExternalPki, mutual: int, optional: int, *, waypoint: bool = False, extra: str = "", **kw: Any
) -> Config:
    docs = gateway_yaml(ext, mutual, optional, **kw) + ("\n---\n" + extra if extra else "")
    if waypoint:
        return seed_with_waypoint(docs)
    from tests.waypoint.conftest import SEED

    return load([("mesh.yaml", SEED.read_text()), ("gateway.yaml", docs)])


async def start_gateway_mesh(
    pki: Pki, ext: ExternalPki, tmp: Path, *, waypoint: bool = False, extra: str = "", **kw: Any
) -> GatewayMesh:
    (tmp / "server-ca.crt").write_bytes(ext.server_ca.cert_pem)
    mutual, optional = _ports()
    config = mesh_config(ext, mutual, optional, waypoint=waypoint, extra=extra, **kw)
    net = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}"
    app_ip, wp_ip = f"{net}.2", f"{net}.3"
    addresses = Addresses(
        pod_ips={"namespace-a/app-a": app_ip, "namespace-a/waypoint-0": wp_ip},
        service_vips={"namespace-a/app-a": VIP},
    )
    app = await start_demo_app(app_ip, 8080, "app-a")
    seen: list[InboundRequest] = []

    def authorize(request: InboundRequest) -> Decision:
        seen.append(request)
        return ALLOW

    dest_creds = pki.creds("namespace-a", "service-account-a")
    destination = HboneServer(
        dest_creds,
        authorize=authorize,
        local_workload=lambda _ip: LocalWorkload("app-a", "namespace-a", dest_creds.identity),
    )
    await destination.start(app_ip, 15008)
    wp: Waypoint | None = None
    wp_lines: list[str] = []
    if waypoint:
        wp = Waypoint(
            WaypointRef("namespace-a", "waypoint"),
            pki.creds("namespace-a", "waypoint"),
            telemetry=RequestTelemetry("waypoint", sink=wp_lines.append),
            access_log=AccessLog(lambda _l: None),
            mark=False,
        )
        wp.apply(config, addresses, 1)
        await wp.start(wp_ip, 15008)
    lines: list[str] = []
    gateway = IngressGateway(
        pki.creds("istio-system", GATEWAY_SA),
        listen_host="127.0.0.1",
        telemetry=RequestTelemetry("source", sink=lines.append),
        mark=False,
    )
    assert gateway.apply(config, addresses) == []
    await gateway.start()
    return GatewayMesh(
        ext, gateway, destination, app, lines, addresses, mutual, optional, tmp, seen, wp, wp_lines
    )


@pytest_asyncio.fixture
async def gw(pki: Pki, ext: ExternalPki, tmp_path: Path) -> AsyncIterator[GatewayMesh]:
    m = await start_gateway_mesh(pki, ext, tmp_path)
    yield m
    await m.close()


def gateway_spiffe() -> str:
    return str(SpiffeId.istio(TD, "istio-system", GATEWAY_SA))
