"""The ingress gateway with real curl clients and certificates from two external CAs (issue 7):
MUTUAL and OPTIONAL_MUTUAL, unknown CA, revoked, expired, SAN allow-list, forged XFCC replaced,
secrets reloaded without a restart, and the path through the destination's waypoint."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from tests.gateway.conftest import (
    HOST,
    ExternalPki,
    GatewayMesh,
    b64,
    gateway_spiffe,
    gateway_yaml,
    issue,
    mesh_config,
    start_gateway_mesh,
)
from tests.waypoint.conftest import SEED, Pki
from zerotunnel.config import load
from zerotunnel.policy.decision import Decision

ALLOW_DECISION = Decision(True, None, None, "allowed", 200)


def _echo(body: str) -> dict[str, object]:
    return json.loads(body)  # type: ignore[no-any-return]


def _refusals(gw: GatewayMesh) -> list[str]:
    return [
        x["error"] for x in gw.logs if x["message"] in ("tls handshake failed", "client certificate refused")
    ]


async def test_mutual_accepts_clients_of_both_external_cas(gw: GatewayMesh) -> None:
    for client, cn in ((gw.ext.client_a, "client-a"), (gw.ext.client_b, "client-b")):
        code, body, err = await gw.curl(client)
        assert code == 0, err
        echo = _echo(body)
        assert echo["path"] == "/data"
        xfcc = echo["headers"]["x-forwarded-client-cert"]  # type: ignore[index]
        der = client.cert.public_bytes(serialization.Encoding.DER)
        assert xfcc.startswith(f"By={gateway_spiffe()};Hash={hashlib.sha256(der).hexdigest()};")
        assert f'Subject="CN={cn},O=clients"' in xfcc
        assert echo["headers"]["x-forwarded-proto"] == "https"  # type: ignore[index]
    a_xfcc = _echo((await gw.curl(gw.ext.client_a))[1])["headers"]["x-forwarded-client-cert"]  # type: ignore[index]
    assert a_xfcc.endswith(";URI=https://client-a.partner-a.example;DNS=client-a.partner-a.example")
    # the destination's node proxy authorizes the gateway's own mesh identity (§7.3)
    assert {str(r.source_identity) for r in gw.seen} == {gateway_spiffe()}


async def test_mutual_refuses_unknown_ca_revoked_expired_and_no_cert(gw: GatewayMesh) -> None:
    cases = {
        "unknown CA": gw.ext.client_unknown,
        "revoked": gw.ext.client_revoked,
        "expired": gw.ext.client_expired,
        "no certificate": None,
    }
    for case, client in cases.items():
        code, body, _ = await gw.curl(client)
        assert code != 0, (case, body)
    assert gw.seen == []  # nothing reached the mesh
    reasons = _refusals(gw)
    assert len(reasons) == 4, reasons
    assert "unable to get local issuer certificate" in reasons[0]
    assert "is revoked by CN=partner-a root CA,O=partner-a" in reasons[1]
    assert "certificate has expired" in reasons[2]
    assert "client certificate required" in reasons[3]


async def test_optional_mutual(gw: GatewayMesh) -> None:
    code, body, err = await gw.curl(None, port=gw.optional_port)
    assert code == 0, err
    assert "x-forwarded-client-cert" not in _echo(body)["headers"]  # type: ignore[operator]
    code, body, err = await gw.curl(gw.ext.client_b, port=gw.optional_port)
    assert code == 0, err
    assert "CN=client-b" in _echo(body)["headers"]["x-forwarded-client-cert"]  # type: ignore[index]
    # presented certificates are validated (§7.1): an unknown CA or a revoked one is still refused
    for client in (gw.ext.client_unknown, gw.ext.client_revoked):
        code, body, _ = await gw.curl(client, port=gw.optional_port)
        assert code != 0, body


async def test_forged_xfcc_replaced(gw: GatewayMesh) -> None:
    forged = "x-forwarded-client-cert: By=spiffe://cluster.local/ns/istio-system/sa/admin;URI=spiffe://evil"
    code, body, err = await gw.curl(gw.ext.client_a, headers=(forged, "X-Envoy-Peer-Metadata: evil"))
    assert code == 0, err
    headers = _echo(body)["headers"]
    assert isinstance(headers, dict)
    assert isinstance(headers["x-forwarded-client-cert"], str)  # one value: ours
    assert "evil" not in headers["x-forwarded-client-cert"]
    assert "x-envoy-peer-metadata" not in headers
    code, body, err = await gw.curl(None, port=gw.optional_port, headers=(forged,))
    assert code == 0, err
    assert "x-forwarded-client-cert" not in _echo(body)["headers"]  # type: ignore[operator]


async def test_subject_alt_names_allow_list(pki: Pki, ext: ExternalPki, tmp_path: Path) -> None:
    m = await start_gateway_mesh(
        pki, ext, tmp_path, sans=("client-a.partner-a.example", "client-b.partner-b.example")
    )
    try:
        assert (await m.curl(ext.client_a))[0] == 0
        assert (await m.curl(ext.client_b))[0] == 0
        code, _, _ = await m.curl(ext.client_wrong_san)
        assert code != 0
        [reason] = _refusals(m)
        assert "match none of subjectAltNames" in reason and "other.partner-a.example" in reason
    finally:
        await m.close()


async def test_secret_reload_without_restart(pki: Pki, ext: ExternalPki, tmp_path: Path) -> None:
    m = await start_gateway_mesh(pki, ext, tmp_path)
    try:
        assert (await m.curl(ext.client_b))[0] == 0
        # partner-b is removed from ca.crt: its clients are refused from the next handshake on
        config = mesh_config(ext, m.mutual_port, m.optional_port, ca_bundle=ext.partner_a.cert_pem)
        assert m.gateway.apply(config, m.addresses) == []
        assert (await m.curl(ext.client_b))[0] != 0
        assert (await m.curl(ext.client_a))[0] == 0
        # a broken secret keeps the last good TLS configuration in force
        broken = mesh_config(ext, m.mutual_port, m.optional_port, ca_bundle=b"not a certificate")
        errors = m.gateway.apply(broken, m.addresses)
        assert errors and "app-credential" in errors[0]
        assert (await m.curl(ext.client_a))[0] == 0
        assert (await m.curl(ext.client_b))[0] != 0
    finally:
        await m.close()


async def test_unrouted_host_and_path(gw: GatewayMesh) -> None:
    code, body, err = await gw.curl(gw.ext.client_a, headers=("Host: other.example.com",))
    assert code == 0, err
    assert body == "route not found\n"


WAYPOINT_POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: partner-a-only, namespace: namespace-a}
spec:
  targetRefs: [{kind: Service, group: "", name: app-a}]
  action: ALLOW
  rules:
    - from: [{source: {principals: [cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account]}}]
      when: [{key: "request.headers[x-forwarded-client-cert]", values: ["*URI=https://client-a.partner-a.example;DNS=client-a.partner-a.example"]}]
"""


async def test_through_waypoint_l7_policy_on_external_identity(
    pki: Pki, ext: ExternalPki, tmp_path: Path
) -> None:
    m = await start_gateway_mesh(pki, ext, tmp_path, waypoint=True, extra=WAYPOINT_POLICY)
    try:
        code, body, err = await m.curl(ext.client_a)
        assert code == 0, err
        assert _echo(body)["name"] == "app-a"
        code, body, err = await m.curl(ext.client_b)
        assert code == 0, err
        assert body == "RBAC: access denied"
        echo = _echo((await m.curl(ext.client_a))[1])
        assert echo["headers"]["x-forwarded-proto"] == "https"  # type: ignore[index]
        # the gateway went through the waypoint; app-a's node proxy saw the waypoint's identity
        assert {str(r.source_identity) for r in m.seen} == {
            "spiffe://cluster.local/ns/namespace-a/sa/waypoint"
        }
        wp_logs = [json.loads(x) for x in m.waypoint_lines]
        assert [x["response_code"] for x in wp_logs] == [200, 403, 200]
        assert {x["src_identity"] for x in wp_logs} == {gateway_spiffe()}
    finally:
        await m.close()


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "seed"


async def test_seed_example_external_clients(pki: Pki, tmp_path: Path) -> None:
    """examples/seed/gateway as shipped: partner-a's and partner-b's clients reach app-a, the stranger's
    (unknown CA) and the revoked client are refused."""
    import random

    from zerotunnel.config import load
    from zerotunnel.demoapp import start_demo_app
    from zerotunnel.gateway.server import IngressGateway
    from zerotunnel.mesh.build import Addresses
    from zerotunnel.node.hbone_server import HboneServer, LocalWorkload
    from zerotunnel.waypoint.telemetry import RequestTelemetry

    files = [EXAMPLE / "mesh.yaml", EXAMPLE / "gateway" / "gateway.yaml", EXAMPLE / "gateway" / "secret.yaml"]
    config = load([(str(p), p.read_text()) for p in files])
    net = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}"
    app_ip, gw_ip = f"{net}.2", f"{net}.9"
    addresses = Addresses(
        pod_ips={"namespace-a/app-a": app_ip}, service_vips={"namespace-a/app-a": "10.96.0.10"}
    )
    app = await start_demo_app(app_ip, 8080, "app-a")
    dest = pki.creds("namespace-a", "service-account-a")
    destination = HboneServer(
        dest,
        authorize=lambda _r: ALLOW_DECISION,
        local_workload=lambda _ip: LocalWorkload("app-a", "namespace-a", dest.identity),
    )
    await destination.start(app_ip, 15008)
    lines: list[str] = []
    gateway = IngressGateway(
        pki.creds("istio-system", "istio-ingressgateway-service-account"),
        gateway="istio-system/app-a-gateway",
        listen_host=gw_ip,
        telemetry=RequestTelemetry("source", sink=lines.append),
        mark=False,
    )
    assert gateway.apply(config, addresses) == []
    await gateway.start()
    try:
        results = {}
        for name in ("partner-a", "partner-b", "stranger", "revoked"):
            proc = await asyncio.create_subprocess_exec(
                "curl",
                "-sS",
                "--max-time",
                "10",
                "--cacert",
                str(EXAMPLE / "gateway" / "server-ca.crt"),
                "--cert",
                str(EXAMPLE / "gateway" / "clients" / f"{name}.crt"),
                "--key",
                str(EXAMPLE / "gateway" / "clients" / f"{name}.key"),
                "--resolve",
                f"app-a.example.com:443:{gw_ip}",
                "https://app-a.example.com/data",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            results[name] = (proc.returncode, json.loads(out)["name"] if proc.returncode == 0 else None)
        assert results == {
            "partner-a": (0, "app-a"),
            "partner-b": (0, "app-a"),
            "stranger": (results["stranger"][0], None),
            "revoked": (results["revoked"][0], None),
        }
        assert results["stranger"][0] != 0 and results["revoked"][0] != 0
    finally:
        await gateway.close()
        await destination.close(0)
        await app.close()


async def test_http2_over_alpn(gw: GatewayMesh) -> None:
    cert, key = gw.ext.client_a.write(gw.tmp, "h2-client")
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--http2",
        "--max-time",
        "10",
        "-w",
        "\n%{http_version}",
        "--cacert",
        str(gw.tmp / "server-ca.crt"),
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--resolve",
        f"app.example.com:{gw.mutual_port}:127.0.0.1",
        f"https://app.example.com:{gw.mutual_port}/h2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    body, _, version = out.decode().rpartition("\n")
    assert version == "2"
    echo = _echo(body)
    assert echo["path"] == "/h2" and "CN=client-a" in echo["headers"]["x-forwarded-client-cert"]  # type: ignore[index]
    [line] = [x for x in gw.logs if x.get("path") == "/h2"]
    assert line["protocol"] == "HTTP/2" and line["response_code"] == 200


async def test_sni_selects_server_on_shared_port(pki: Pki, ext: ExternalPki, tmp_path: Path) -> None:
    """Two servers on one port told apart by SNI (Envoy's filter-chain match): app.example.com is
    MUTUAL, open.example.com is SIMPLE with its own certificate."""
    open_cert = issue(ext.server_ca, "open.example.com", dns=("open.example.com",), server=True)
    m = await start_gateway_mesh(pki, ext, tmp_path)
    try:
        port = m.mutual_port
        extra = f"""
---
apiVersion: v1
kind: Secret
metadata: {{name: open-credential, namespace: istio-system}}
data: {{tls.crt: {b64(open_cert.cert_pem)}, tls.key: {b64(open_cert.key_pem)}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: open, namespace: istio-system}}
spec:
  hosts: [open.example.com]
  gateways: [istio-system/ingress]
  http: [{{route: [{{destination: {{host: app-a.namespace-a.svc.cluster.local}}}}]}}]
"""
        text = gateway_yaml(ext, port, m.optional_port).replace(
            "  - name: optional\n",
            f"  - name: open\n    port: {{number: {port}, name: https-open, protocol: HTTPS}}\n"
            "    hosts: [open.example.com]\n    tls: {mode: SIMPLE, credentialName: open-credential}\n"
            "  - name: optional\n",
        )
        config = load([("mesh.yaml", SEED.read_text()), ("gw.yaml", text + extra)])
        assert m.gateway.apply(config, m.addresses) == []
        proc = await asyncio.create_subprocess_exec(
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(tmp_path / "server-ca.crt"),
            "--resolve",
            f"open.example.com:{port}:127.0.0.1",
            f"https://open.example.com:{port}/open",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert _echo(out.decode())["path"] == "/open"
        assert "x-forwarded-client-cert" not in _echo(out.decode())["headers"]  # type: ignore[operator]
        # app.example.com on the same port still requires a client certificate
        assert (await m.curl(None))[0] != 0
        assert (await m.curl(ext.client_a))[0] == 0
        assert any("client certificate required" in r for r in _refusals(m))
    finally:
        await m.close()


async def test_connection_cap_evicts_a_silent_socket_for_a_client(gw: GatewayMesh, tmp_path: Path) -> None:
    """At the connection cap with a socket still silent in its handshake, a new client takes that
    socket's place (security.md §3 caps; the silent one is the flood's); established connections
    are untouched."""
    gw.gateway.max_connections = 3
    cert, key = gw.ext.client_a.write(tmp_path, "partner")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(gw.tmp / "server-ca.crt"))
    ctx.load_cert_chain(str(cert), str(key))

    async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        writer.write(f"GET /data HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
        return (await asyncio.wait_for(reader.read(65536), 5))[:12]

    held = [await asyncio.open_connection("127.0.0.1", gw.mutual_port, ssl=ctx, server_hostname=HOST)
            for _ in range(2)]
    assert [await get(r, w) for r, w in held] == [b"HTTP/1.1 200"] * 2
    silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", gw.mutual_port)
    await asyncio.sleep(0.1)
    fresh = await asyncio.open_connection("127.0.0.1", gw.mutual_port, ssl=ctx, server_hostname=HOST)
    assert await get(*fresh) == b"HTTP/1.1 200"
    assert await asyncio.wait_for(silent_reader.read(), 5) == b""  # dropped
    assert [await get(r, w) for r, w in held] == [b"HTTP/1.1 200"] * 2
    load = gw.gateway.load[gw.mutual_port]
    assert (load.evictions, load.refused, load.open) == (1, 0, 3)
    for _, writer in [*held, fresh, (silent_reader, silent_writer)]:
        writer.transport.abort()
