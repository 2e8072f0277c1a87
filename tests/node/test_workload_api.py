"""The SPIFFE Workload API, tested with py-spiffe as the client (users-spiffe-conventions.md §3)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from spiffe import JwtSource, TrustDomain, WorkloadApiClient, X509Source  # type: ignore[attr-defined]

from zerotunnel.control.castore import init_root
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.node.certs import CertificateManager, LocalCaClient
from zerotunnel.node.workload_api import WorkloadApiServer
from zerotunnel.proto import workload_pb2, workload_pb2_grpc

TD = "cluster.local"
WEB = SpiffeId.istio(TD, "shop", "web")
ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class Api:
    server: WorkloadApiServer
    manager: CertificateManager
    clock: Clock
    ca_dir: Path

    @property
    def socket(self) -> str:
        return self.server.endpoint


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    clock = Clock()
    init_root(tmp_path / "ca", TD, clock())
    manager = CertificateManager(
        LocalCaClient(tmp_path / "ca", clock), ttl=timedelta(hours=1), clock=clock, recheck_interval=0.05
    )
    server = WorkloadApiServer(tmp_path / "pods" / "web" / "agent.sock", WEB, manager)
    await server.start()
    try:
        yield Api(server, manager, clock, tmp_path / "ca")
    finally:
        await server.close()
        await manager.close()


def _fetch(socket: str) -> tuple[str, bytes, str, bytes]:
    with WorkloadApiClient(socket_path=socket) as client:
        svid = client.fetch_x509_svid()
        bundles = client.fetch_x509_bundles()
        bundle = bundles.get_bundle_for_trust_domain(TrustDomain(TD))
        assert bundle is not None
        [root] = bundle.x509_authorities
        leaf = svid.leaf.public_bytes(serialization.Encoding.PEM)
        root_pem = root.public_bytes(serialization.Encoding.PEM)
        return str(svid.spiffe_id), leaf, str(bundle.trust_domain), root_pem


async def test_py_spiffe_fetches_the_pods_svid_and_bundle(api: Api) -> None:
    spiffe_id, leaf, td, root = await asyncio.to_thread(_fetch, api.socket)
    assert spiffe_id == str(WEB)
    assert td == TD
    assert root == (api.ca_dir / "root-cert.pem").read_bytes()
    current = api.manager.current(WEB)
    assert current is not None and current.chain_pem.startswith(leaf)
    assert os.stat(api.server.socket_path).st_mode & 0o777 == 0o666


async def test_x509_source_sees_the_rotated_svid(api: Api) -> None:
    source = await asyncio.to_thread(X509Source, socket_path=api.socket, timeout_in_seconds=10)
    try:
        first = source.get_x509_context().default_svid.leaf.serial_number
        # past half-life of the 1 h certificate: the manager renews, the stream pushes the new SVID
        api.clock.offset = timedelta(minutes=31)
        for _ in range(200):
            await asyncio.sleep(0.05)
            if source.get_x509_context().default_svid.leaf.serial_number != first:
                break
        svid = source.get_x509_context().default_svid
        assert svid.leaf.serial_number != first
        assert str(svid.spiffe_id) == str(WEB)
        current = api.manager.current(WEB)
        assert current is not None
        assert current.chain_pem.startswith(svid.leaf.public_bytes(serialization.Encoding.PEM))
    finally:
        await asyncio.to_thread(source.close)


async def test_a_subprocess_with_only_spiffe_endpoint_socket_gets_its_identity(api: Api) -> None:
    script = textwrap.dedent(
        """
        from spiffe import WorkloadApiClient, X509Source
        with WorkloadApiClient() as client:
            svid = client.fetch_x509_svid()
            bundles = client.fetch_x509_bundles()
        source = X509Source(timeout_in_seconds=10)
        again = source.get_x509_context().default_svid
        source.close()
        print(svid.spiffe_id, len(list(bundles.bundles)), again.spiffe_id == svid.spiffe_id)
        """
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script,
        env={"SPIFFE_ENDPOINT_SOCKET": api.socket},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == [str(WEB), "1", "True"]


async def _raw_call(socket: str, with_header: bool) -> grpc.aio.AioRpcError | None:
    metadata = (("workload.spiffe.io", "true"),) if with_header else ()
    async with grpc.aio.insecure_channel(f"unix:{socket.removeprefix('unix://')}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        try:
            await stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=metadata, timeout=5)
            stream = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=metadata, timeout=5)
            async for _ in stream:
                break
            stream.cancel()
        except grpc.aio.AioRpcError as exc:
            return exc
    return None


async def test_the_security_header_is_mandatory(api: Api) -> None:
    err = await _raw_call(api.socket, with_header=False)
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "workload.spiffe.io" in (err.details() or "")
    assert await _raw_call(api.socket, with_header=True) is None


async def test_no_identity_yet_is_permission_denied(tmp_path: Path) -> None:
    # the CA directory does not exist, so the manager can never obtain a certificate
    manager = CertificateManager(LocalCaClient(tmp_path / "missing"), recheck_interval=0.05)
    server = WorkloadApiServer(tmp_path / "agent.sock", WEB, manager, first_wait=0.2)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{tmp_path / 'agent.sock'}") as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            stream = stub.FetchX509SVID(
                workload_pb2.X509SVIDRequest(), metadata=(("workload.spiffe.io", "true"),), timeout=5
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stream:
                    pass
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await server.close()
        await manager.close()


def _jwt_round_trip(socket: str) -> tuple[str, str, object]:
    with WorkloadApiClient(socket_path=socket) as client:
        token = client.fetch_jwt_svid(audience={"orders"})
        validated = client.validate_jwt_svid(token.token, "orders")
        bundles = client.fetch_jwt_bundles()
        refused = None
        try:
            client.validate_jwt_svid(token.token, "payments")
        except Exception as exc:  # py-spiffe wraps the gRPC error
            refused = exc
    assert bundles.get_bundle_for_trust_domain(TrustDomain(TD)) is not None
    return str(token.spiffe_id), str(validated.spiffe_id), refused


async def test_jwt_svids_are_minted_validated_and_published(api: Api) -> None:
    subject, validated, refused = await asyncio.to_thread(_jwt_round_trip, api.socket)
    assert subject == validated == str(WEB)
    assert refused is not None


def _jwt_source(socket: str) -> str:
    source = JwtSource(socket_path=socket, timeout_in_seconds=10)
    try:
        token = source.fetch_svid(audience={"orders"})
        bundle = source.get_bundle_for_trust_domain(TrustDomain(TD))
        assert bundle is not None and len(bundle.jwt_authorities) == 1
        return str(token.spiffe_id)
    finally:
        source.close()


async def test_jwt_source_works(api: Api) -> None:
    assert await asyncio.to_thread(_jwt_source, api.socket) == str(WEB)


async def test_close_removes_the_socket_and_releases_the_identity(api: Api) -> None:
    await asyncio.to_thread(_fetch, api.socket)
    [status] = api.manager.status()
    assert status.identity == str(WEB) and status.users == 1
    await api.server.close()
    assert not api.server.socket_path.exists()
    assert api.manager.status() == []


async def test_envoy_sds_serves_default_and_rootca_and_pushes_rotation(api: Api) -> None:
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
    from envoy.service.discovery.v3 import discovery_pb2
    from envoy.service.secret.v3 import sds_pb2_grpc

    from zerotunnel.node.workload_api import SECRET_TYPE

    def secrets(response: discovery_pb2.DiscoveryResponse) -> dict[str, secret_pb2.Secret]:
        out = {}
        for resource in response.resources:
            secret = secret_pb2.Secret()
            assert resource.Unpack(secret)
            out[secret.name] = secret
        return out

    async with grpc.aio.insecure_channel(f"unix:{api.server.socket_path}") as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        fetched = await stub.FetchSecrets(
            discovery_pb2.DiscoveryRequest(resource_names=["ROOTCA"], type_url=SECRET_TYPE), timeout=5
        )
        roots = secrets(fetched)["ROOTCA"].validation_context.trusted_ca.inline_bytes
        assert roots == (api.ca_dir / "root-cert.pem").read_bytes()
        call = stub.StreamSecrets()
        wanted = ["default", "ROOTCA"]
        await call.write(discovery_pb2.DiscoveryRequest(resource_names=wanted, type_url=SECRET_TYPE))
        first = await asyncio.wait_for(call.read(), 5)
        got = secrets(first)
        assert set(got) == {"default", "ROOTCA"}
        current = api.manager.current(WEB)
        assert current is not None
        assert got["default"].tls_certificate.certificate_chain.inline_bytes == current.chain_pem
        assert got["default"].tls_certificate.private_key.inline_bytes == current.key_pem
        await call.write(discovery_pb2.DiscoveryRequest(
            resource_names=["default", "ROOTCA"], type_url=SECRET_TYPE,
            version_info=first.version_info, response_nonce=first.nonce,
        ))
        api.clock.offset = timedelta(minutes=31)  # past half-life: the manager rotates
        second = await asyncio.wait_for(call.read(), 10)
        rotated = secrets(second)["default"].tls_certificate.certificate_chain.inline_bytes
        assert rotated != current.chain_pem
        now = api.manager.current(WEB)
        assert now is not None and rotated == now.chain_pem
        assert int(second.version_info) > int(first.version_info)
        call.cancel()
