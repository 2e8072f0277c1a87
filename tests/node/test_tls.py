from __future__ import annotations

import asyncio
import ssl
import subprocess
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.node.tls import (
    TlsIdentityError,
    WorkloadCredentials,
    client_context,
    server_context,
    verify_client_peer,
    verify_server_peer,
)

Pki = Any  # the `pki` fixture of conftest.py
TD = "cluster.local"


class _Capture(asyncio.Protocol):
    def __init__(self) -> None:
        self.ssl_object: Any = None
        self.made = asyncio.get_event_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.ssl_object = transport.get_extra_info("ssl_object")
        if not self.made.done():
            self.made.set_result(transport)


async def _handshake(server_creds: WorkloadCredentials, client_ctx: ssl.SSLContext) -> tuple[Any, Any]:
    loop = asyncio.get_running_loop()
    srv_proto = _Capture()
    server = await loop.create_server(lambda: srv_proto, "127.0.0.1", 0, ssl=server_context(server_creds))
    port = server.sockets[0].getsockname()[1]
    try:
        _, cli = await asyncio.wait_for(
            loop.create_connection(_Capture, "127.0.0.1", port, ssl=client_ctx, server_hostname=""), 5
        )
        await asyncio.wait_for(srv_proto.made, 5)
        return srv_proto.ssl_object, cli.ssl_object
    finally:
        server.close()


async def _server_outcome(server_creds: WorkloadCredentials, client_ctx: ssl.SSLContext) -> str:
    """What the server concluded about the client: a verified identity, or why it was refused."""
    loop = asyncio.get_running_loop()
    srv_proto = _Capture()
    server = await loop.create_server(lambda: srv_proto, "127.0.0.1", 0, ssl=server_context(server_creds))
    port = server.sockets[0].getsockname()[1]
    try:
        try:
            await asyncio.wait_for(
                loop.create_connection(_Capture, "127.0.0.1", port, ssl=client_ctx, server_hostname=""), 5
            )
        except (ssl.SSLError, ConnectionError):
            return "handshake refused"
        try:
            await asyncio.wait_for(asyncio.shield(srv_proto.made), 2)
        except TimeoutError:
            return "handshake refused"
        try:
            return str(verify_client_peer(srv_proto.ssl_object, server_creds, _now()).spiffe_id)
        except TlsIdentityError as exc:
            return exc.message
    finally:
        server.close()


def _now() -> datetime:
    return datetime.now(UTC)


def test_mutual_tls_verified_both_ways(pki: Pki) -> None:
    server, client = pki.creds("default", "productpage"), pki.creds("default", "curl")
    s_obj, c_obj = asyncio.run(_handshake(server, client_context(client)))
    assert c_obj.version() == "TLSv1.3" and c_obj.selected_alpn_protocol() == "h2"
    assert c_obj.cipher()[0] in ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256")
    assert verify_client_peer(s_obj, server, _now()).spiffe_id == client.identity
    assert verify_server_peer(c_obj, client, {server.identity}, _now()).spiffe_id == server.identity
    # no session ticket was issued (security.md rule 5)
    assert not c_obj.session.has_ticket


def test_client_rejects_unexpected_server_identity(pki: Pki) -> None:
    server, client = pki.creds("default", "productpage"), pki.creds("default", "curl")
    _, c_obj = asyncio.run(_handshake(server, client_context(client)))
    want = SpiffeId.istio(TD, "default", "reviews")
    with pytest.raises(TlsIdentityError) as info:
        verify_server_peer(c_obj, client, {want}, _now())
    assert info.value.message == (
        f"identity verification error: peer did not present the expected SAN ({want}), got {server.identity}"
    )
    assert info.value.response_flag == "IDENTITY_ERROR"


def test_other_root_refused_at_handshake(pki: Pki, other_root_creds: WorkloadCredentials) -> None:
    server = pki.creds("default", "productpage")
    outcome = asyncio.run(_server_outcome(server, client_context(other_root_creds)))
    assert outcome == "handshake refused"


def test_ca_as_leaf_refused_by_reverification(pki: Pki, ca_as_leaf_creds: WorkloadCredentials) -> None:
    server = pki.creds("default", "productpage")
    outcome = asyncio.run(_server_outcome(server, client_context(ca_as_leaf_creds)))
    # OpenSSL 3 already refuses this CA (no clientAuth purpose); verify_peer would say leaf-is-ca.
    assert outcome == "handshake refused" or "leaf-is-ca" in outcome
    # and our re-verification refuses it too, should an OpenSSL build ever let it through
    leaf = x509.load_pem_x509_certificates(ca_as_leaf_creds.chain_pem)[0]
    with pytest.raises(TlsIdentityError, match="leaf-is-ca"):
        verify_client_peer(_FakeSsl(leaf.public_bytes(serialization.Encoding.DER)), server, _now())  # type: ignore[arg-type]


class _FakeSsl:
    def __init__(self, der: bytes) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool) -> bytes:
        return self.der

    def selected_alpn_protocol(self) -> str:
        return "h2"


def test_other_trust_domain_refused(pki: Pki, other_td_creds: WorkloadCredentials) -> None:
    # The server trusts the foreign root (federated bundle) so OpenSSL lets it through; our
    # trust-domain check must not.
    server = pki.creds("default", "productpage", bundle=other_td_creds.bundle)
    outcome = asyncio.run(_server_outcome(server, client_context(other_td_creds)))
    assert outcome == (
        "tls error: peer did not present the expected trustdomain (cluster.local), got clusterset.local"
    )


def test_trust_domain_alias_accepted(pki: Pki) -> None:
    """An alias of our trust domain is ours (DESIGN.md: aliases honoured, an improvement on Istio)."""
    bundle = pki.bundle.with_alias("old.local", TD)
    server = pki.creds("default", "productpage", bundle=bundle)
    client = pki.creds("legacy", "app", td="old.local", bundle=bundle)
    outcome = asyncio.run(_server_outcome(server, client_context(client)))
    assert outcome == "spiffe://old.local/ns/legacy/sa/app"


def test_tls12_refused(pki: Pki) -> None:
    client = pki.creds("default", "curl")
    ctx = client_context(client)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    assert asyncio.run(_server_outcome(pki.creds("default", "productpage"), ctx)) == "handshake refused"


def test_no_client_cert_refused(pki: Pki) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    assert asyncio.run(_server_outcome(pki.creds("default", "productpage"), ctx)) == "handshake refused"


def test_openssl_s_client_sees_no_ticket_and_tls13(pki: Pki, tmp_path: Any) -> None:
    """An outside client (openssl) negotiates TLS 1.3 + h2, and gets no session ticket."""
    client = pki.creds("default", "curl")
    (tmp_path / "c.pem").write_bytes(client.chain_pem)
    (tmp_path / "k.pem").write_bytes(client.key_pem)
    (tmp_path / "ca.pem").write_text(client.roots_pem())
    server = pki.creds("default", "productpage")

    async def run() -> str:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(_Capture, "127.0.0.1", 0, ssl=server_context(server))
        port = srv.sockets[0].getsockname()[1]
        try:
            proc = await asyncio.create_subprocess_exec(
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-tls1_3",
                "-alpn",
                "h2",
                "-cert",
                str(tmp_path / "c.pem"),
                "-key",
                str(tmp_path / "k.pem"),
                "-CAfile",
                str(tmp_path / "ca.pem"),
                "-sess_out",
                str(tmp_path / "sess"),
                "-noservername",
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            await asyncio.sleep(0.5)
            out, _ = await asyncio.wait_for(proc.communicate(b""), 10)
            return out.decode()
        finally:
            srv.close()

    out = asyncio.run(run())
    assert "TLSv1.3" in out and "ALPN protocol: h2" in out
    assert "NewSessionTicket" not in out and "TLS session ticket:" not in out


def test_client_sends_no_sni(pki: Pki) -> None:
    """§1.6: SNI disabled; asyncio's server_hostname="" must not put one in the ClientHello."""
    seen: list[object] = []
    server = pki.creds("default", "productpage")

    async def run() -> None:
        ctx = server_context(server)
        ctx.sni_callback = lambda _obj, name, _ctx: seen.append(name)
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(_Capture, "127.0.0.1", 0, ssl=ctx)
        port = srv.sockets[0].getsockname()[1]
        try:
            cctx = client_context(pki.creds("default", "curl"))
            await loop.create_connection(_Capture, "127.0.0.1", port, ssl=cctx, server_hostname="")
            await asyncio.sleep(0.1)
        finally:
            srv.close()

    asyncio.run(run())
    assert seen == [None]
