"""Corrupt certificate and key files on reload (issue 9; security.md §4 item 28, ghostunnel's
reload-broken-certificate / reload-broken-cabundle).

Every file the project re-reads while running, each given garbage, a PEM cut short, a key that is not
the certificate's, and a certificate that is not a CA where a CA is required:

- the control plane's CA directory (plug-in CA, root rotation: `ControlPlane.reload_ca`, re-read every
  status interval) — a real control plane on loopback, a real node renewing its SVID over mTLS;
- a standalone CA directory (`--ca-dir` of `zerotunnel node`, `waypoint` and `gateway`: `LocalCaClient`,
  re-read when a certificate is due) — the real certificate manager;
- the ingress gateway's server credential and external-CA bundle (a Secret, re-read on every
  configuration change) — a real gateway answering the real `curl`.

Each time: the process keeps serving with the last good material, reports the error naming the file and
what is wrong with it, and takes the next good file.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from tests.gateway.conftest import (
    ExternalPki,
    GatewayMesh,
    b64,
    ext,  # noqa: F401 - fixture
    gateway_yaml,
    pki,  # noqa: F401 - fixture
    start_gateway_mesh,
)
from tests.waypoint.conftest import SEED, Pki
from zerotunnel.config import load
from zerotunnel.control.castore import init_root
from zerotunnel.control.client import GrpcCaClient, enroll, load_node_identity
from zerotunnel.control.server import ControlPlane
from zerotunnel.identity.ca import CertificateAuthority
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.node.certs import CertificateManager, LocalCaClient
from zerotunnel.testing.certs import issue_test_svid

TD = "cluster.local"
WEB = SpiffeId.istio(TD, "shop", "web")
CONFIG = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec: {serviceAccountName: web, nodeName: node-a, containers: [{name: app, image: x}]}
"""


@dataclass(frozen=True)
class Corruption:
    """Files to overwrite in a CA directory, and what the report must say (file, reason)."""

    files: dict[str, bytes]
    names: str
    says: str


def _cut_inside_last_block(pem: bytes) -> bytes:
    return pem[: len(pem) - 200]


def ca_dir_corruptions(old: CertificateAuthority, other: CertificateAuthority) -> dict[str, Corruption]:
    leaf, leaf_key, _ = issue_test_svid(old, str(WEB))
    return {
        "garbage-signing-cert": Corruption({"ca-cert.pem": os.urandom(400)}, "ca-cert.pem",
                                           "no PEM certificate found"),
        "truncated-signing-cert": Corruption({"ca-cert.pem": old.signing_cert_pem[:300]}, "ca-cert.pem",
                                             "truncated PEM"),
        # two roots (rotation step 1) cut inside the second: parsed as a one-root bundle before
        "truncated-root-bundle": Corruption(
            {"root-cert.pem": _cut_inside_last_block(old.root_bundle_pem + other.root_bundle_pem)},
            "root-cert.pem", "truncated PEM"),
        "garbage-key": Corruption({"ca-key.pem": b"not a key at all\n"}, "ca-key.pem",
                                  "not an unencrypted PEM private key"),
        "empty-key": Corruption({"ca-key.pem": b""}, "ca-key.pem", "not an unencrypted PEM private key"),
        "mismatched-key": Corruption({"ca-key.pem": other.signing_key_pem()}, "ca-key.pem", "does not match"),
        "leaf-as-signing-cert": Corruption({"ca-cert.pem": leaf, "ca-key.pem": leaf_key}, "ca-cert.pem",
                                           "is not a CA"),
        "leaf-as-root": Corruption({"root-cert.pem": leaf}, "root-cert.pem", "not a self-signed CA"),
    }


CA_CASES = ["garbage-signing-cert", "truncated-signing-cert", "truncated-root-bundle", "garbage-key",
            "empty-key", "mismatched-key", "leaf-as-signing-cert", "leaf-as-root"]


async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not predicate():
        assert loop.time() - started < timeout, f"{what} not within {timeout}s"
        await asyncio.sleep(0.02)
    return loop.time() - started


def _issued_by(chain_pem: bytes, ca: CertificateAuthority) -> bool:
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    try:
        leaf.verify_directly_issued_by(ca.signing_cert)
    except (ValueError, TypeError, Exception):  # InvalidSignature has no common base with ValueError
        return False
    return True


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[tuple[ControlPlane, GrpcCaClient, CertificateAuthority]]:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "mesh.yaml").write_text(CONFIG)
    old = init_root(tmp_path / "cacerts", TD, datetime.now(UTC))
    cp = ControlPlane(tmp_path / "cp", [tmp_path / "config"], ca_dir=tmp_path / "cacerts",
                      listen="127.0.0.1:0", enrol_listen="127.0.0.1:0", status_interval=0.05)
    await cp.start()
    token, _ = cp.tokens.create("node-a", datetime.now(UTC))
    await enroll(f"127.0.0.1:{cp.ca_port}", token, tmp_path / "node", old.root_bundle_pem,
                 enrol_address=f"127.0.0.1:{cp.enrol_port}")
    client = GrpcCaClient(f"127.0.0.1:{cp.ca_port}", tmp_path / "node")
    try:
        yield cp, client, old
    finally:
        await client.close()
        await cp.stop(grace=0)


@pytest.mark.parametrize("case", CA_CASES)
async def test_control_plane_keeps_its_ca_when_the_ca_dir_goes_bad(
    plane: tuple[ControlPlane, GrpcCaClient, CertificateAuthority], tmp_path: Path, case: str,
    caplog: pytest.LogCaptureFixture, figures: Callable[..., None],
) -> None:
    cp, node, old = plane
    other = CertificateAuthority.create_root(TD, datetime.now(UTC))
    corruption = ca_dir_corruptions(old, other)[case]
    cacerts = tmp_path / "cacerts"
    good = {name: (cacerts / name).read_bytes() for name in os.listdir(cacerts)}
    before = cp.ca
    caplog.set_level(logging.ERROR, logger="zerotunnel")
    for name, data in corruption.files.items():
        (cacerts / name).write_bytes(data)
    reported = await _until(lambda: cp.status()["ca"]["error"] is not None, 5, "the error reported")
    error = cp.status()["ca"]["error"]
    assert corruption.names in error and corruption.says in error, error
    assert cp.ca is before, "a bad CA directory replaced the CA in service"
    assert any(corruption.says in r.getMessage() and "keeping the current CA" in r.getMessage()
               for r in caplog.records), caplog.text
    # still serving: the node renews its SVID over mTLS and gets it from the CA in service
    renewed = await node.refresh_node_identity()
    assert _issued_by(renewed.chain_pem, old)
    # the next good files: rotation step 1 (old CA, both roots in the bundle)
    for name, data in good.items():
        (cacerts / name).write_bytes(data)
    (cacerts / "root-cert.pem").write_bytes(old.root_bundle_pem + other.root_bundle_pem)
    taken = await _until(lambda: cp.status()["ca"]["error"] is None and len(cp.ca.roots) == 2, 5,
                         "the next good CA directory taken")
    renewed = await node.refresh_node_identity()
    assert _issued_by(renewed.chain_pem, old) and renewed.roots_pem.count(b"BEGIN CERTIFICATE") == 2
    ident = load_node_identity(tmp_path / "node")
    assert ident is not None and ident.roots_pem == renewed.roots_pem
    figures(case=case, reported_s=round(reported, 2), next_good_taken_s=round(taken, 2), error=error[-160:])


@pytest.mark.parametrize("case", CA_CASES)
async def test_standalone_ca_dir_goes_bad_the_certificate_in_service_stays(
    tmp_path: Path, case: str, figures: Callable[..., None]
) -> None:
    """`--ca-dir` (node, waypoint, gateway): the CA directory is re-read when a certificate is due. A bad
    one fails the renewal with the file and reason in the certificate status, the certificate in service
    stays current, and the next good directory is signed from."""

    class Clock:
        offset = timedelta(0)

        def __call__(self) -> datetime:
            return datetime.now(UTC) + self.offset

    clock = Clock()
    cacerts = tmp_path / "cacerts"
    old = init_root(cacerts, TD, clock())
    other = CertificateAuthority.create_root(TD, clock())
    corruption = ca_dir_corruptions(old, other)[case]
    good = {name: (cacerts / name).read_bytes() for name in os.listdir(cacerts)}
    manager = CertificateManager(LocalCaClient(cacerts, clock), ttl=timedelta(hours=1), clock=clock,
                                 recheck_interval=0.02)
    updates: list[bytes] = []
    manager.on_update(lambda creds: updates.append(creds.chain_pem))
    try:
        first = await manager.acquire(WEB)
        for name, data in corruption.files.items():
            (cacerts / name).write_bytes(data)
        clock.offset = timedelta(minutes=40)  # past half-life: the renewal reads the directory
        await _until(lambda: manager.status()[0].failures >= 1, 5, "the renewal attempted")
        [status] = manager.status()
        assert status.last_error is not None
        assert corruption.names in status.last_error and corruption.says in status.last_error, status
        assert manager.current(WEB) is first and len(updates) == 1
        for name, data in good.items():
            (cacerts / name).write_bytes(data)
        (cacerts / "root-cert.pem").write_bytes(old.root_bundle_pem + other.root_bundle_pem)
        manager.retry_failed_now()
        await _until(lambda: len(updates) == 2, 5, "the next good directory signed from")
        current = manager.current(WEB)
        assert current is not None and _issued_by(current.chain_pem, old)
        assert current.roots_pem().count("BEGIN CERTIFICATE") == 2
        figures(case=case, error=status.last_error[-160:])
    finally:
        await manager.close()


GATEWAY_CASES = ["garbage-cert", "truncated-cert", "garbage-key", "mismatched-key", "truncated-ca-bundle",
                 "leaf-in-ca-bundle"]


def _gateway_corruption(pkix: ExternalPki, case: str) -> tuple[str, str, str, str]:
    """(what to replace in the YAML, by what, the Secret key the report must name, what it must say)."""
    server_cert, server_key = b64(pkix.server.cert_pem), b64(pkix.server.key_pem)
    bundle = b64(pkix.partner_a.cert_pem + pkix.partner_b.cert_pem)
    cases = {
        "garbage-cert": (server_cert, b64(os.urandom(300)), "tls.crt", "no PEM certificate found"),
        "truncated-cert": (server_cert, b64(pkix.server.cert_pem[:400]), "tls.crt", "truncated PEM"),
        "garbage-key": (server_key, b64(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
                        "tls.key", "not an unencrypted PEM private key"),
        "mismatched-key": (server_key, b64(pkix.client_a.key_pem), "tls.key", "does not match tls.crt"),
        "truncated-ca-bundle": (bundle, b64(_cut_inside_last_block(pkix.partner_a.cert_pem
                                                                  + pkix.partner_b.cert_pem)),
                                "ca.crt", "truncated PEM"),
        "leaf-in-ca-bundle": (bundle, b64(pkix.partner_a.cert_pem + pkix.client_b.cert_pem), "ca.crt",
                              "is not a CA certificate"),
    }
    return cases[case]


@pytest.mark.parametrize("case", GATEWAY_CASES)
async def test_gateway_keeps_its_tls_material_when_the_secret_goes_bad(
    pki: Pki, ext: ExternalPki, tmp_path: Path, case: str,  # noqa: F811 - fixtures
    caplog: pytest.LogCaptureFixture, figures: Callable[..., None],
) -> None:
    m: GatewayMesh = await start_gateway_mesh(pki, ext, tmp_path)
    try:
        assert (await m.curl(ext.client_a))[0] == 0
        assert (await m.curl(ext.client_b))[0] == 0
        old, new, key, says = _gateway_corruption(ext, case)
        docs = gateway_yaml(ext, m.mutual_port, m.optional_port)
        assert old in docs
        caplog.set_level(logging.ERROR, logger="zerotunnel")
        bad = load([("mesh.yaml", SEED.read_text()), ("gateway.yaml", docs.replace(old, new))])
        errors = m.gateway.apply(bad, m.addresses)
        assert errors, "a corrupt Secret was taken without a word"
        assert all("istio-system/app-credential" in e and key in e and says in e for e in errors), errors
        assert says in caplog.text
        # the last good credential and bundle are still in force: both partners' clients get in
        assert (await m.curl(ext.client_a))[0] == 0, "the gateway stopped serving partner-a"
        assert (await m.curl(ext.client_b))[0] == 0, "the gateway lost partner-b from its bundle"
        assert (await m.curl(ext.client_unknown))[0] != 0
        # the next good Secret (partner-b removed from the bundle) applies at once
        config = load([("mesh.yaml", SEED.read_text()),
                       ("gateway.yaml", gateway_yaml(ext, m.mutual_port, m.optional_port,
                                                     ca_bundle=ext.partner_a.cert_pem))])
        assert m.gateway.apply(config, m.addresses) == []
        assert (await m.curl(ext.client_a))[0] == 0
        assert (await m.curl(ext.client_b))[0] != 0
        figures(case=case, errors=[e[-160:] for e in errors])
    finally:
        await m.close()
