"""The node side: enrolment, the persisted node identity (reused on restart), renewal, GrpcCaClient."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from zerotunnel.control.ca_service import node_identity
from zerotunnel.control.client import (
    ControlPlaneError,
    GrpcCaClient,
    NodeIdentity,
    chain_from_response,
    enroll,
    ensure_node_identity,
    load_node_identity,
)
from zerotunnel.control.server import ControlPlane
from zerotunnel.errors import InputError
from zerotunnel.identity.ca import CertificateAuthority
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.node.certs import CertificateManager

TD = "cluster.local"
WEB = SpiffeId.istio(TD, "shop", "web")
CONFIG = """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec: {serviceAccountName: web, nodeName: node-a, containers: [{name: app, image: x}]}
"""


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


async def _start(tmp: Path, clock: Clock | None = None) -> ControlPlane:
    (tmp / "config").mkdir(exist_ok=True)
    (tmp / "config" / "pods.yaml").write_text(CONFIG)
    plane = ControlPlane(
        tmp / "cp", [tmp / "config"], listen="127.0.0.1:0", enrol_listen="127.0.0.1:0",
        **({"clock": clock} if clock else {}),
    )
    await plane.start()
    return plane


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    cp = await _start(tmp_path)
    try:
        yield cp
    finally:
        await cp.stop(grace=0)


def _addr(port: int) -> str:
    return f"127.0.0.1:{port}"


async def _enrol(plane: ControlPlane, state: Path, node: str = "node-a") -> NodeIdentity:
    token, _ = plane.tokens.create(node, datetime.now(UTC))
    return await enroll(
        _addr(plane.ca_port), token, state, plane.ca.root_bundle_pem, enrol_address=_addr(plane.enrol_port)
    )


async def test_enrolment_persists_the_identity_with_a_private_key_file(
    plane: ControlPlane, tmp_path: Path
) -> None:
    ident = await _enrol(plane, tmp_path / "node")
    assert ident.node == "node-a" and ident.identity == node_identity(TD, "node-a")
    assert (tmp_path / "node" / "node" / "node-key.pem").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "node" / "node").stat().st_mode & 0o777 == 0o700
    again = load_node_identity(tmp_path / "node")
    assert again == ident
    assert "PRIVATE" not in repr(again)


async def test_a_restarted_node_reuses_its_identity_without_a_token(tmp_path: Path) -> None:
    plane = await _start(tmp_path)
    try:
        first = await _enrol(plane, tmp_path / "node")
    finally:
        await plane.stop(grace=0)
    # both restart: the control plane keeps its CA, the node its identity; no token is needed
    plane = await _start(tmp_path)
    try:
        ident = await ensure_node_identity(
            _addr(plane.ca_port), tmp_path / "node", token=None, ca_root_pem=None
        )
        assert ident.chain_pem == first.chain_pem and ident.key_pem == first.key_pem
        client = GrpcCaClient(_addr(plane.ca_port), tmp_path / "node")
        manager = CertificateManager(client)
        try:
            creds = await manager.acquire(WEB, timeout=10)
            assert creds.identity == WEB
        finally:
            await manager.close()
            await client.close()
        assert plane.service.stats().per_node == {"node-a": 1}
        assert sum(plane.status()["enrolment"]["refused"].values()) == 0
    finally:
        await plane.stop(grace=0)


async def test_ensure_node_identity_needs_a_token_when_there_is_none_or_it_expired(
    plane: ControlPlane, tmp_path: Path
) -> None:
    with pytest.raises(InputError) as err:
        await ensure_node_identity(_addr(plane.ca_port), tmp_path / "n", token=None, ca_root_pem=None)
    assert "does not exist" in err.value.message
    await _enrol(plane, tmp_path / "n")
    late = Clock()
    late.offset = timedelta(hours=25)
    with pytest.raises(InputError) as err:
        await ensure_node_identity(
            _addr(plane.ca_port), tmp_path / "n", token=None, ca_root_pem=None, clock=late
        )
    assert "has expired" in err.value.message


async def test_the_node_identity_is_renewed_at_half_life(tmp_path: Path) -> None:
    clock = Clock()
    plane = await _start(tmp_path, clock)
    client: GrpcCaClient | None = None
    try:
        first = await _enrol(plane, tmp_path / "node")
        client = GrpcCaClient(_addr(plane.ca_port), tmp_path / "node", clock=clock)
        stop = asyncio.Event()
        task = asyncio.create_task(client.maintain(stop, recheck=0.05))
        await asyncio.sleep(0.2)
        assert client.identity.chain_pem == first.chain_pem
        clock.offset = timedelta(hours=12, minutes=5)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if client.identity.chain_pem != first.chain_pem:
                break
        stop.set()
        await task
        renewed = client.identity
        assert renewed.chain_pem != first.chain_pem and renewed.key_pem != first.key_pem
        assert renewed.not_after > first.not_after
        # persisted: a restart picks up the renewed identity
        assert load_node_identity(tmp_path / "node") == renewed
        # (that a renewed SVID authenticates is tested in test_server.py with the real clock: here the
        # shifted clock makes it "not yet valid" to OpenSSL)
    finally:
        if client is not None:
            await client.close()
        await plane.stop(grace=0)


def _csr(identity: SpiffeId) -> bytes:
    from zerotunnel.identity.csr import generate_key, make_csr

    return make_csr(identity, generate_key())


async def test_an_unreachable_control_plane_is_an_error_not_a_hang(
    tmp_path: Path, plane: ControlPlane
) -> None:
    await _enrol(plane, tmp_path / "node")
    client = GrpcCaClient("127.0.0.1:1", tmp_path / "node", timeout=2)
    try:
        with pytest.raises(ControlPlaneError) as err:
            await client.sign(WEB, _csr(WEB), None)
        assert err.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    finally:
        await client.close()


def test_chain_from_response_checks_the_leaf_identity() -> None:
    ca = CertificateAuthority.create_root(TD, datetime.now(UTC))
    chain, _ = ca.issue_with_key(WEB, datetime.now(UTC))
    parsed = chain_from_response(chain.as_cert_chain_response(), WEB)
    assert parsed == chain
    with pytest.raises(ControlPlaneError) as err:
        chain_from_response(chain.as_cert_chain_response(), SpiffeId.istio(TD, "shop", "db"))
    assert "asked for spiffe://cluster.local/ns/shop/sa/db" in err.value.message
    with pytest.raises(ControlPlaneError):
        chain_from_response(chain.as_cert_chain_response()[:1], WEB)
    with pytest.raises(ControlPlaneError):
        chain_from_response(["junk", chain.roots_pem.decode()], WEB)


def test_grpc_client_needs_an_enrolled_identity(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        GrpcCaClient("127.0.0.1:15012", tmp_path)
