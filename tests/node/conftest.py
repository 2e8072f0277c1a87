"""PKI for the node tests: a mesh CA (root → intermediate), plus the bad peers security.md asks for."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from zerotunnel.identity.bundle import TrustBundle
from zerotunnel.identity.ca import CertificateAuthority
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.node.accesslog import AccessLog
from zerotunnel.node.hbone_client import HbonePool, PoolKey
from zerotunnel.node.hbone_server import HboneServer, InboundRequest, LocalWorkload
from zerotunnel.node.metrics import ProxyMetrics
from zerotunnel.node.relay import TcpRelay
from zerotunnel.node.tls import WorkloadCredentials
from zerotunnel.policy.decision import Decision

TD = "cluster.local"
NOW = datetime.now(UTC)


@dataclass
class Pki:
    ca: CertificateAuthority
    bundle: TrustBundle

    def creds(
        self,
        ns: str,
        sa: str,
        td: str = TD,
        ca: CertificateAuthority | None = None,
        bundle: TrustBundle | None = None,
    ) -> WorkloadCredentials:
        ident = SpiffeId.istio(td, ns, sa)
        chain, key = (ca or self.ca).issue_with_key(ident, NOW - timedelta(minutes=1), timedelta(hours=2))
        return WorkloadCredentials.from_pem(ident, chain.chain_pem, key, bundle or self.bundle)


@pytest.fixture(scope="session")
def pki() -> Pki:
    root = CertificateAuthority.create_root(TD, NOW - timedelta(days=1))
    inter = CertificateAuthority.create_intermediate(root, NOW - timedelta(days=1))
    bundle = TrustBundle.from_certs(TD, root.roots)
    return Pki(inter, bundle)


@pytest.fixture(scope="session")
def other_root_creds(pki: Pki) -> WorkloadCredentials:
    """Same trust domain name, another root (not in our bundle)."""
    other = CertificateAuthority.create_root(TD, NOW - timedelta(days=1))
    bundle = TrustBundle.from_certs(TD, other.roots)
    return pki.creds("default", "evil", ca=other, bundle=bundle)


@pytest.fixture(scope="session")
def ca_as_leaf_creds(pki: Pki) -> WorkloadCredentials:
    """The mesh's own signing CA certificate and key presented as a client leaf."""
    cert = pki.ca.signing_cert
    key = pki.ca.signing_key_pem()
    chain = cert.public_bytes(serialization.Encoding.PEM) + b"".join(pki.ca.intermediates_pem)
    return WorkloadCredentials(
        SpiffeId.istio(TD, "default", "ca"),
        chain,
        key,
        pki.bundle,
        tuple(x509.load_pem_x509_certificates(chain)[1:]),
    )


@pytest.fixture(scope="session")
def other_td_creds(pki: Pki) -> WorkloadCredentials:
    """A valid SVID of another trust domain whose root we do trust (federated bundle)."""
    other = CertificateAuthority.create_root("clusterset.local", NOW - timedelta(days=1))
    return pki.creds(
        "default",
        "foreign",
        td="clusterset.local",
        ca=other,
        bundle=TrustBundle.from_certs("clusterset.local", other.roots).merge(pki.bundle),
    )


# -- a loopback HBONE "mesh": app ← server ← pool ← outbound listener ← app client -------------------


ALLOW = Decision(True, None, None, "allowed", 200)


def allow_all(_request: InboundRequest) -> Decision:
    return ALLOW


class Env:
    """Builds the pieces inside the test's event loop and tears them down in `aclose`."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.server_creds = pki.creds("default", "server")
        self.client_creds = pki.creds("default", "client")
        self.metrics = ProxyMetrics()
        self.log_lines: list[str] = []
        self.access = AccessLog(self.log_lines.append)
        self._closers: list[Callable[[], Any]] = []

    @property
    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_lines]

    async def app(self, handler: str = "echo", host: str = "127.0.0.1") -> int:
        """A plaintext app: `echo` (half-close aware), `count` (reads to EOF, answers the byte count)."""

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                if handler == "echo":
                    while data := await reader.read(1 << 18):
                        writer.write(data)
                        await writer.drain()
                    writer.write_eof()
                elif handler == "count":
                    total = 0
                    while data := await reader.read(1 << 18):
                        total += len(data)
                    writer.write(str(total).encode())
                    await writer.drain()
                elif handler == "hold":
                    await reader.read()
                writer.close()
            except (ConnectionError, OSError):
                pass

        srv = await asyncio.start_server(serve, host, 0)
        self._closers.append(srv.close)
        return int(srv.sockets[0].getsockname()[1])

    def workload(self, ip: str) -> LocalWorkload | None:
        return (
            LocalWorkload("server", "default", self.server_creds.identity) if ip.startswith("127.") else None
        )

    async def server(self, host: str = "127.0.0.1", **kw: Any) -> HboneServer:
        kw.setdefault("authorize", allow_all)
        kw.setdefault("local_workload", self.workload)
        srv = HboneServer(
            kw.pop("credentials", self.server_creds), metrics=self.metrics, access_log=self.access, **kw
        )
        await srv.start(host, 0)
        self._closers.append(lambda: srv.close(grace=0))
        return srv

    def pool(self, creds: WorkloadCredentials | None = None, **kw: Any) -> HbonePool:
        c = creds or self.client_creds
        kw.setdefault("metrics", ProxyMetrics())
        pool = HbonePool(lambda _ident: c, mark=False, **kw)
        self._closers.append(pool.close)
        return pool

    def key(
        self, server: HboneServer, creds: WorkloadCredentials | None = None, expect: SpiffeId | None = None
    ) -> PoolKey:
        c = creds or self.client_creds
        return PoolKey(c.identity, frozenset({expect or self.server_creds.identity}), server.address, None)

    async def outbound(
        self, pool: HbonePool, key: PoolKey, authority: str, errors: list[str] | None = None
    ) -> int:
        """A stand-in for the node proxy's 15001: accept, connect through the pool, relay."""
        loop = asyncio.get_running_loop()

        def factory() -> TcpRelay:
            relay = TcpRelay()

            async def join() -> None:
                try:
                    stream = await pool.connect(key, authority)
                except Exception as exc:
                    if errors is not None:
                        errors.append(getattr(exc, "message", str(exc)))
                    relay.fail(str(exc))
                    return
                relay.attach(stream)

            task = loop.create_task(join())
            self._closers.append(task.cancel)
            return relay

        srv = await loop.create_server(factory, "127.0.0.1", 0)
        self._closers.append(srv.close)
        return int(srv.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        for closer in reversed(self._closers):
            res = closer()
            if asyncio.iscoroutine(res):
                await res


@pytest.fixture
def env(pki: Pki) -> Env:
    return Env(pki)
