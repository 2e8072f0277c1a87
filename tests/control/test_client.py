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


# -- config distribution ------------------------------------------------------------------------------

SECRET = """
apiVersion: v1
kind: Secret
metadata: {name: gw-cert, namespace: istio-system}
type: kubernetes.io/tls
data: {tls.crt: dGVzdA==, tls.key: c2VjcmV0LWtleQ==}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Secret
  metadata: {name: listed-cert, namespace: istio-system}
  type: kubernetes.io/tls
  data: {tls.crt: dGVzdA==, tls.key: bGlzdGVkLWtleQ==}
- apiVersion: v1
  kind: Pod
  metadata: {name: listed, namespace: shop}
  spec: {serviceAccountName: listed, nodeName: node-b, containers: [{name: app, image: x}]}
"""
POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: shop}
spec: {}
"""


async def _wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_snapshots_are_pushed_acked_and_updated_on_config_edits(tmp_path: Path) -> None:
    from zerotunnel.control.client import ConfigSubscription, Snapshot

    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "secret.yaml").write_text(SECRET)
    plane = await _start(tmp_path)
    applied: list[Snapshot] = []
    stop = asyncio.Event()
    try:
        await _enrol(plane, tmp_path / "node")
        client = GrpcCaClient(_addr(plane.ca_port), tmp_path / "node")
        sub = ConfigSubscription(client, applied.append)
        task = asyncio.create_task(sub.run(stop))
        await _wait_for(lambda: plane.sessions.get("node-a") and plane.sessions["node-a"].acked == 1)
        [first] = applied
        assert first.version == "1" and first.node == "node-a"
        assert sorted(p.meta.name for p in first.config.pods) == ["listed", "web"]
        assert first.config.secrets == ()  # gateway keys never reach nodes, not even inside a List
        sent = "".join(text for _, text in first.documents)
        assert "c2VjcmV0LWtleQ" not in sent and "bGlzdGVkLWtleQ" not in sent
        assert first.roots_pem == plane.ca.root_bundle_pem
        # an edit is pushed within a second or so, and acked
        started = asyncio.get_running_loop().time()
        (tmp_path / "config" / "policy.yaml").write_text(POLICY)
        await _wait_for(lambda: plane.sessions["node-a"].acked == 2)
        assert asyncio.get_running_loop().time() - started < 2.0
        assert [p.meta.name for p in applied[-1].config.authorization_policies] == ["deny-all"]
        # a broken edit is rejected by the control plane: nothing is pushed, the error is reported
        (tmp_path / "config" / "policy.yaml").write_text(POLICY.replace("spec: {}", "spec: {action: MAYBE}"))
        await _wait_for(lambda: plane.status()["config"]["error"] is not None)
        assert "policy.yaml" in plane.status()["config"]["error"]
        await asyncio.sleep(0.3)
        assert plane.snapshot_version == 2 and len(applied) == 2
        assert sub.current is applied[-1]
        node_status = {n["name"]: n for n in plane.status()["nodes"]}["node-a"]
        assert node_status["acked"] == 2 and node_status["streams"] == 1 and node_status["nacked"] is None
        stop.set()
        await task
        await client.close()
    finally:
        stop.set()
        await plane.stop(grace=0)


async def test_a_nacked_snapshot_keeps_the_last_good_one_and_is_reported(tmp_path: Path) -> None:
    from zerotunnel.control.client import ConfigSubscription, Snapshot

    plane = await _start(tmp_path)
    stop = asyncio.Event()
    seen: list[Snapshot] = []

    def apply(snapshot: Snapshot) -> None:
        if snapshot.config.authorization_policies:
            raise ValueError("this node cannot enforce that policy yet")
        seen.append(snapshot)

    try:
        await _enrol(plane, tmp_path / "node")
        client = GrpcCaClient(_addr(plane.ca_port), tmp_path / "node")
        sub = ConfigSubscription(client, apply)
        task = asyncio.create_task(sub.run(stop))
        await _wait_for(lambda: plane.sessions.get("node-a") and plane.sessions["node-a"].acked == 1)
        (tmp_path / "config" / "policy.yaml").write_text(POLICY)
        await _wait_for(lambda: plane.sessions["node-a"].nacked == 2)
        session = plane.sessions["node-a"]
        assert session.acked == 1 and "cannot enforce" in (session.nack_error or "")
        assert sub.current is seen[0] and sub.current.version == "1"
        assert "snapshot version 2 rejected" in (sub.last_error or "")
        metrics = plane.metrics.text().decode()
        assert "pilot_total_xds_rejects_total 1.0" in metrics and "pilot_xds 1.0" in metrics
        assert 'pilot_xds_pushes_total{type="full"} 1.0' in metrics
        assert 'pilot_xds_pushes_total{type="change"} 1.0' in metrics
        assert "pilot_xds_push_time_count 1.0" in metrics
        # fixing the config produces a new version that is acked
        (tmp_path / "config" / "policy.yaml").unlink()
        await _wait_for(lambda: plane.sessions["node-a"].acked == 3)
        stop.set()
        await task
        await client.close()
    finally:
        stop.set()
        await plane.stop(grace=0)


async def test_the_node_resyncs_after_a_control_plane_restart(tmp_path: Path) -> None:
    from zerotunnel.control.client import ConfigSubscription, Snapshot

    plane = await _start(tmp_path)
    port = plane.ca_port
    stop = asyncio.Event()
    applied: list[Snapshot] = []
    await _enrol(plane, tmp_path / "node")
    client = GrpcCaClient(_addr(port), tmp_path / "node")
    sub = ConfigSubscription(client, applied.append, initial_backoff=0.05)
    task = asyncio.create_task(sub.run(stop))
    try:
        await _wait_for(lambda: len(applied) == 1)
        await plane.stop(grace=0)
        await _wait_for(lambda: not sub.connected.is_set())
        assert sub.current is applied[0]  # the last good snapshot stays while the control plane is away
        (tmp_path / "config" / "policy.yaml").write_text(POLICY)
        plane = ControlPlane(tmp_path / "cp", [tmp_path / "config"], listen=_addr(port),
                             enrol_listen="127.0.0.1:0")
        await plane.start()
        await _wait_for(lambda: len(applied) == 2, timeout=10)
        assert [p.meta.name for p in applied[-1].config.authorization_policies] == ["deny-all"]
        await _wait_for(lambda: plane.sessions["node-a"].acked == 1)
    finally:
        stop.set()
        await task
        await client.close()
        await plane.stop(grace=0)
