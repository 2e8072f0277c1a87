"""The control plane's gRPC CA and enrolment over real mTLS on loopback (issue 6, spec §3.2/§3.3)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import struct_pb2  # type: ignore[import-untyped]

from zerotunnel.control.ca_service import node_identity
from zerotunnel.control.client import ControlPlaneError, GrpcCaClient, enroll, load_node_identity
from zerotunnel.control.server import ControlPlane, enrolment_address, fingerprint, split_address
from zerotunnel.identity.bundle import TrustBundle
from zerotunnel.identity.ca import CertificateAuthority
from zerotunnel.identity.csr import generate_key, make_csr, private_key_pem
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.identity.verify import verify_peer
from zerotunnel.proto import ca_pb2, ca_pb2_grpc
from zerotunnel.testing.certs import make_bad_svid

TD = "cluster.local"
WEB = SpiffeId.istio(TD, "shop", "web")  # scheduled on node-a
DB = SpiffeId.istio(TD, "shop", "db")  # scheduled on node-b

CONFIG = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec: {serviceAccountName: web, nodeName: node-a, containers: [{name: app, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop}
spec: {serviceAccountName: db, nodeName: node-b, containers: [{name: app, image: x}]}
"""


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class Plane:
    plane: ControlPlane
    clock: Clock
    tmp: Path

    @property
    def ca_addr(self) -> str:
        return f"127.0.0.1:{self.plane.ca_port}"

    @property
    def enrol_addr(self) -> str:
        return f"127.0.0.1:{self.plane.enrol_port}"

    @property
    def root(self) -> bytes:
        return self.plane.ca.root_bundle_pem

    async def node(self, name: str) -> GrpcCaClient:
        token, _ = self.plane.tokens.create(name, self.clock())
        state = self.tmp / f"state-{name}"
        await enroll(self.ca_addr, token, state, self.root, enrol_address=self.enrol_addr)
        return GrpcCaClient(self.ca_addr, state, clock=self.clock)


@pytest.fixture
async def cp(tmp_path: Path) -> AsyncIterator[Plane]:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "mesh.yaml").write_text(CONFIG)
    clock = Clock()
    plane = ControlPlane(
        tmp_path / "cp", [tmp_path / "config"], listen="127.0.0.1:0", enrol_listen="127.0.0.1:0", clock=clock
    )
    await plane.start()
    try:
        yield Plane(plane, clock, tmp_path)
    finally:
        await plane.stop(grace=0)


def _csr(identity: SpiffeId) -> bytes:
    return make_csr(identity, generate_key())


def _verify(chain_leaf: bytes, intermediates: tuple[bytes, ...], roots: bytes, expected: SpiffeId) -> None:
    bundle = TrustBundle.from_pem(TD, roots)
    inter = [x509.load_pem_x509_certificate(p) for p in intermediates]
    peer = verify_peer(chain_leaf, inter, bundle, datetime.now(UTC), {expected}, peer_role="server")
    assert peer.spiffe_id == expected


async def test_node_gets_a_certificate_for_a_pod_scheduled_on_it(cp: Plane) -> None:
    node = await cp.node("node-a")
    try:
        chain = await node.sign(WEB, _csr(WEB), None)
    finally:
        await node.close()
    _verify(chain.leaf_pem, chain.intermediates_pem, chain.roots_pem, WEB)
    leaf = x509.load_pem_x509_certificate(chain.leaf_pem)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(hours=24, minutes=2)
    assert chain.roots_pem == cp.root
    stats = cp.plane.service.stats()
    assert stats.issued == 1 and stats.per_node == {"node-a": 1}


async def test_node_refused_for_a_pod_on_another_node_and_for_a_made_up_identity(
    cp: Plane, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "zerotunnel.control.ca")
    node = await cp.node("node-a")
    try:
        with pytest.raises(ControlPlaneError) as err:
            await node.sign(DB, _csr(DB), None)
        assert err.value.code == "PERMISSION_DENIED"
        assert "no pod with that identity is scheduled on it" in err.value.detail
        made_up = SpiffeId.istio(TD, "shop", "admin")
        with pytest.raises(ControlPlaneError) as err:
            await node.sign(made_up, _csr(made_up), None)
        assert err.value.code == "PERMISSION_DENIED"
        other_td = SpiffeId.istio("evil.example", "shop", "web")
        with pytest.raises(ControlPlaneError) as err:
            await node.sign(other_td, _csr(other_td), None)
        assert err.value.code == "PERMISSION_DENIED"
    finally:
        await node.close()
    assert cp.plane.service.stats().refused == {"permission-denied": 3}
    wanted = "node-a may not obtain spiffe://cluster.local/ns/shop/sa/db"
    assert any(wanted in r.message for r in caplog.records)


async def test_the_san_comes_from_the_authorized_identity_and_limits_hold(cp: Plane) -> None:
    node = await cp.node("node-a")
    try:
        # a CSR naming another identity than the impersonated one is refused, not rewritten
        with pytest.raises(ControlPlaneError) as err:
            await node.sign(WEB, _csr(DB), None)
        assert err.value.code == "INVALID_ARGUMENT" and "authorised only for" in err.value.detail
        with pytest.raises(ControlPlaneError) as err:
            await node.sign(WEB, _csr(WEB), timedelta(days=91))
        assert err.value.code == "INVALID_ARGUMENT" and "max allowed TTL" in err.value.detail
        chain = await node.sign(WEB, _csr(WEB), timedelta(hours=1))
        leaf = x509.load_pem_x509_certificate(chain.leaf_pem)
        assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(hours=1, minutes=2)
    finally:
        await node.close()


async def _call(
    address: str, creds: grpc.ChannelCredentials, csr: bytes, impersonate: SpiffeId | None = None
) -> ca_pb2.IstioCertificateResponse:
    options = [("grpc.ssl_target_name_override", "istiod.istio-system.svc")]
    async with grpc.aio.secure_channel(address, creds, options=options) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
        request = ca_pb2.IstioCertificateRequest(csr=csr.decode(), validity_duration=3600)
        if impersonate is not None:
            meta = struct_pb2.Struct()
            meta.update({"ImpersonatedIdentity": str(impersonate)})
            request.metadata.CopyFrom(meta)
        return await stub.CreateCertificate(request, timeout=5)


async def test_no_client_certificate_is_unauthenticated(cp: Plane) -> None:
    no_cert = grpc.ssl_channel_credentials(cp.root)
    # the enrolment port speaks TLS without client certificates: a CSR there has no caller identity
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _call(cp.enrol_addr, no_cert, _csr(WEB), WEB)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no client certificate" in (err.value.details() or "")
    # the CA port refuses the handshake itself
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _call(cp.ca_addr, no_cert, _csr(WEB), WEB)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert cp.plane.service.stats().issued == 0


async def test_invalid_client_identities_are_refused(cp: Plane) -> None:
    now = datetime.now(UTC)
    ca = cp.plane.ca
    # a node SVID with two URI SANs: OpenSSL accepts the chain, the SVID rules do not (rule 2)
    leaf, key, _ = make_bad_svid(ca, "two-uri-sans", str(node_identity(TD, "node-a")), now=now)
    twin = grpc.ssl_channel_credentials(cp.root, key, leaf)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _call(cp.ca_addr, twin, _csr(WEB), WEB)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "client certificate rejected" in (err.value.details() or "")
    # a pod SVID from the mesh CA is not a node: only nodes may call
    chain, key = ca.issue_with_key(WEB, now, timedelta(hours=1))
    pod = grpc.ssl_channel_credentials(cp.root, key, chain.chain_pem)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _call(cp.ca_addr, pod, _csr(WEB), WEB)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not a node proxy" in (err.value.details() or "")
    # a node SVID from another CA (same trust domain name) fails the handshake
    other = CertificateAuthority.create_root(TD, now)
    chain, key = other.issue_with_key(node_identity(TD, "node-a"), now, timedelta(hours=1))
    forged = grpc.ssl_channel_credentials(cp.root, key, chain.chain_pem)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _call(cp.ca_addr, forged, _csr(WEB), WEB)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    refused = cp.plane.service.stats().refused
    assert refused == {"unauthenticated": 1, "permission-denied": 1}


async def test_a_node_renews_its_own_identity_without_impersonation(cp: Plane) -> None:
    node = await cp.node("node-b")
    try:
        before = node.identity
        after = await node.refresh_node_identity()
        assert after.identity == before.identity == node_identity(TD, "node-b")
        assert after.chain_pem != before.chain_pem and after.key_pem != before.key_pem
        # the renewed SVID is the one used from now on
        chain = await node.sign(DB, _csr(DB), None)
        assert b"BEGIN CERTIFICATE" in chain.leaf_pem
    finally:
        await node.close()


async def test_used_unknown_and_expired_tokens_are_refused(
    cp: Plane, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "zerotunnel.control.tokens")
    token, _ = cp.plane.tokens.create("node-a", cp.clock(), timedelta(hours=1))
    first = await enroll(cp.ca_addr, token, cp.tmp / "n1", cp.root, enrol_address=cp.enrol_addr)
    assert first.identity == node_identity(TD, "node-a")
    with pytest.raises(ControlPlaneError) as err:
        await enroll(cp.ca_addr, token, cp.tmp / "n2", cp.root, enrol_address=cp.enrol_addr)
    assert err.value.code == "UNAUTHENTICATED" and "already been used" in err.value.detail
    assert load_node_identity(cp.tmp / "n2") is None
    with pytest.raises(ControlPlaneError) as err:
        await enroll(cp.ca_addr, "ztjoin.forged", cp.tmp / "n3", cp.root, enrol_address=cp.enrol_addr)
    assert err.value.code == "UNAUTHENTICATED" and "not valid" in err.value.detail
    expired, _ = cp.plane.tokens.create("node-c", cp.clock() - timedelta(hours=2), timedelta(hours=1))
    with pytest.raises(ControlPlaneError) as err:
        await enroll(cp.ca_addr, expired, cp.tmp / "n4", cp.root, enrol_address=cp.enrol_addr)
    assert err.value.code == "UNAUTHENTICATED" and "expired" in err.value.detail
    messages = " | ".join(r.message for r in caplog.records)
    assert "already used" in messages and "expired" in messages and "unknown join token" in messages
    status = cp.plane.status()
    assert status["enrolment"]["refused"] == {"used": 1, "unknown": 1, "expired": 1}
    assert [n["name"] for n in status["nodes"]] == ["node-a"]


async def test_enrolment_checks_the_server_against_the_given_root(cp: Plane) -> None:
    token, _ = cp.plane.tokens.create("node-a", cp.clock())
    stranger = CertificateAuthority.create_root(TD, datetime.now(UTC)).root_bundle_pem
    with pytest.raises(ControlPlaneError) as err:
        await enroll(cp.ca_addr, token, cp.tmp / "n", stranger, enrol_address=cp.enrol_addr, timeout=3)
    assert err.value.code == "UNAVAILABLE"
    # the token was not spent by the failed attempt: the server never saw it
    assert all(r.used_at is None for r in cp.plane.tokens.records())


async def test_a_bad_csr_does_not_burn_the_token(cp: Plane) -> None:
    from zerotunnel.proto import enrol_pb2, enrol_pb2_grpc

    token, _ = cp.plane.tokens.create("node-a", cp.clock())
    options = [("grpc.ssl_target_name_override", "istiod.istio-system.svc")]
    async with grpc.aio.secure_channel(
        cp.enrol_addr, grpc.ssl_channel_credentials(cp.root), options=options
    ) as channel:
        stub = enrol_pb2_grpc.NodeEnrolmentStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Enrol(enrol_pb2.EnrolRequest(token=token, csr="not a csr"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all(r.used_at is None for r in cp.plane.tokens.records())


async def test_status_file_and_ca_persistence(cp: Plane, tmp_path: Path) -> None:
    node = await cp.node("node-a")
    try:
        await node.sign(WEB, _csr(WEB), None)
        with pytest.raises(ControlPlaneError):
            await node.sign(DB, _csr(DB), None)
    finally:
        await node.close()
    cp.plane.write_status()
    status = json.loads((tmp_path / "cp" / "status.json").read_text())
    assert status["certificates"]["issued"] == 1
    assert status["certificates"]["refused"] == {"permission-denied": 1}
    assert status["ca"]["root_sha256"] == fingerprint(cp.root)
    assert status["config"] == {"version": 1, "error": None}
    key_file = tmp_path / "cp" / "ca" / "ca-key.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "cp" / "status.json").stat().st_mode & 0o777 == 0o600
    # the key is not in anything we return or write outside the CA directory
    key_pem = serialization.load_pem_private_key(key_file.read_bytes(), None)
    assert private_key_pem(key_pem).decode() not in (tmp_path / "cp" / "status.json").read_text()  # type: ignore[arg-type]


async def test_a_second_start_reuses_the_ca(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "mesh.yaml").write_text(CONFIG)
    roots = []
    for _ in range(2):
        plane = ControlPlane(tmp_path / "cp", [tmp_path / "config"], listen="127.0.0.1:0",
                             enrol_listen="127.0.0.1:0")
        await plane.start()
        roots.append(plane.ca.root_bundle_pem)
        await plane.stop(grace=0)
    assert roots[0] == roots[1]


def test_addresses() -> None:
    assert split_address("127.0.0.1:15012") == ("127.0.0.1", 15012)
    assert split_address("[::1]:15012") == ("::1", 15012)
    assert enrolment_address("127.0.0.1:15012") == "127.0.0.1:15013"
    assert enrolment_address("[::1]:15012") == "[::1]:15013"


async def test_root_rotation_add_reissue_retire_without_a_refused_node(tmp_path: Path) -> None:
    """security.md rule 16: add the new root to the bundle, issue from the new CA, drop the old root."""
    from zerotunnel.control.castore import init_root, write_files

    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "mesh.yaml").write_text(CONFIG)
    cacerts = tmp_path / "cacerts"
    old = init_root(cacerts, TD, datetime.now(UTC))
    plane = ControlPlane(tmp_path / "cp", [tmp_path / "config"], ca_dir=cacerts,
                         listen="127.0.0.1:0", enrol_listen="127.0.0.1:0")
    await plane.start()
    cp = Plane(plane, Clock(), tmp_path)
    addr = cp.ca_addr
    state = tmp_path / "node"
    token, _ = plane.tokens.create("node-a", datetime.now(UTC))
    await enroll(addr, token, state, old.root_bundle_pem, enrol_address=cp.enrol_addr)
    old_node_svid = load_node_identity(state)
    assert old_node_svid is not None

    def issuer(pem: bytes) -> x509.Name:
        return x509.load_pem_x509_certificate(pem).issuer

    async def pod_cert() -> bytes:
        client = GrpcCaClient(addr, state)  # a new channel: a new TLS handshake with the current config
        try:
            chain = await client.sign(WEB, _csr(WEB), None)
            await client.refresh_node_identity()
        finally:
            await client.close()
        return chain.leaf_pem

    try:
        new = CertificateAuthority.create_root(TD, datetime.now(UTC))
        assert new.signing_cert.subject == old.signing_cert.subject  # same name: only keys tell them apart
        # 1. add the new root to the bundle; still issuing from the old CA
        write_files({cacerts / "root-cert.pem": (old.root_bundle_pem + new.root_bundle_pem, 0o644)})
        assert plane.reload_ca() and len(plane.ca.roots) == 2
        leaf = await pod_cert()
        x509.load_pem_x509_certificate(leaf).verify_directly_issued_by(old.signing_cert)
        assert load_node_identity(state).roots_pem.count(b"BEGIN CERTIFICATE") == 2  # type: ignore[union-attr]
        # 2. issue from the new CA (bundle still holds both roots): nodes with old SVIDs still get in
        write_files({
            cacerts / "ca-cert.pem": (new.signing_cert_pem, 0o644),
            cacerts / "ca-key.pem": (new.signing_key_pem(), 0o600),
            cacerts / "cert-chain.pem": (new.signing_cert_pem, 0o644),
        })
        assert plane.reload_ca()
        leaf = await pod_cert()
        x509.load_pem_x509_certificate(leaf).verify_directly_issued_by(new.signing_cert)
        renewed = load_node_identity(state)
        assert renewed is not None
        x509.load_pem_x509_certificate(renewed.chain_pem).verify_directly_issued_by(new.signing_cert)
        # 3. retire the old root: the renewed node keeps working, an SVID from the old root is refused
        write_files({cacerts / "root-cert.pem": (new.root_bundle_pem, 0o644)})
        assert plane.reload_ca() and len(plane.ca.roots) == 1
        leaf = await pod_cert()
        x509.load_pem_x509_certificate(leaf).verify_directly_issued_by(new.signing_cert)
        stale = grpc.ssl_channel_credentials(
            new.root_bundle_pem, old_node_svid.key_pem, old_node_svid.chain_pem
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _call(addr, stale, _csr(WEB), WEB)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert plane.status()["certificates"]["refused"] == {}
        # a broken CA directory keeps the current CA and is reported
        write_files({cacerts / "ca-key.pem": (old.signing_key_pem(), 0o600)})
        assert not plane.reload_ca()
        assert "does not match" in plane.status()["ca"]["error"]
        await pod_cert()
    finally:
        await plane.stop(grace=0)


def _grpc_over_tls12(port: int, creds: tuple[bytes, bytes], root: bytes, body: bytes) -> dict[str, str]:
    """One unary gRPC call by hand (h2 over stdlib ssl) with TLS 1.2, which grpcio cannot be told to use."""
    import socket
    import ssl
    import tempfile

    import h2.config
    import h2.connection
    import h2.events

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=root.decode())
    ctx.set_alpn_protocols(["h2"])
    with tempfile.NamedTemporaryFile() as f:
        f.write(creds[0] + creds[1])
        f.flush()
        ctx.load_cert_chain(f.name)
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with ctx.wrap_socket(raw, server_hostname="istiod.istio-system.svc") as tls:
        assert tls.version() == "TLSv1.2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [
            (":method", "POST"), (":scheme", "https"), (":authority", "istiod.istio-system.svc"),
            (":path", "/istio.v1.auth.IstioCertificateService/CreateCertificate"),
            ("content-type", "application/grpc"), ("te", "trailers"),
        ])
        conn.send_data(1, b"\0" + len(body).to_bytes(4, "big") + body, end_stream=True)
        tls.sendall(conn.data_to_send())
        headers: dict[str, str] = {}
        while True:
            data = tls.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    headers.update({k.decode(): v.decode() for k, v in event.headers})
                if isinstance(event, h2.events.StreamEnded):
                    return headers
            tls.sendall(conn.data_to_send())
    return headers


async def test_tls_below_1_3_is_refused_per_call(cp: Plane) -> None:
    import asyncio

    node = await cp.node("node-a")
    await node.close()
    ident = node.identity
    request = ca_pb2.IstioCertificateRequest(csr=_csr(WEB).decode())
    request.metadata.update({"ImpersonatedIdentity": str(WEB)})
    headers = await asyncio.to_thread(
        _grpc_over_tls12, cp.plane.ca_port, (ident.chain_pem, ident.key_pem), cp.root,
        request.SerializeToString(),
    )
    assert headers.get("grpc-status") == str(grpc.StatusCode.UNAUTHENTICATED.value[0])
    assert "TLS 1.3 is required" in headers.get("grpc-message", "").replace("%20", " ")
    assert cp.plane.service.stats().issued == 0


async def test_a_node_adopts_a_new_root_bundle_from_any_response(tmp_path: Path) -> None:
    from zerotunnel.control.castore import init_root, write_files

    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "mesh.yaml").write_text(CONFIG)
    old = init_root(tmp_path / "cacerts", TD, datetime.now(UTC))
    plane = ControlPlane(tmp_path / "cp", [tmp_path / "config"], ca_dir=tmp_path / "cacerts",
                         listen="127.0.0.1:0", enrol_listen="127.0.0.1:0")
    await plane.start()
    try:
        cp = Plane(plane, Clock(), tmp_path)
        node = await cp.node("node-a")
        new = CertificateAuthority.create_root(TD, datetime.now(UTC))
        both = old.root_bundle_pem + new.root_bundle_pem
        write_files({tmp_path / "cacerts" / "root-cert.pem": (both, 0o644)})
        assert plane.reload_ca()
        await node.sign(WEB, _csr(WEB), None)  # no renewal of the node SVID: only the bundle moves
        stored = load_node_identity(tmp_path / "state-node-a")
        assert stored is not None and stored.roots_pem == both
        assert stored.chain_pem == node.identity.chain_pem
        # the next call is made on a channel that trusts both roots, and works
        await node.sign(WEB, _csr(WEB), None)
        await node.close()
    finally:
        await plane.stop(grace=0)
