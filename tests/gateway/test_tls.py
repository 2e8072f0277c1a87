"""The gateway's own TLS layer (gateway/tls.py): a refused handshake tells the client why.

Real outside clients: `openssl s_client` and `curl` (the binaries), and the stdlib client. Envoy and
OpenSSL servers answer a client without a certificate on a MUTUAL port with the TLS 1.3 alert
`certificate_required` (116); `handshake_failure` (40) on TLS 1.2.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from pathlib import Path

from tests.gateway.conftest import HOST, GatewayMesh


async def s_client(gw: GatewayMesh, *extra: str, port: int | None = None) -> str:
    """`openssl s_client` that sends a request after the handshake; its combined output."""
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"127.0.0.1:{port or gw.mutual_port}", "-servername", HOST,
        "-CAfile", str(gw.tmp / "server-ca.crt"), "-ign_eof", *extra,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    request = f"GET /data HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n".encode()
    out, _ = await asyncio.wait_for(proc.communicate(request), 20)
    return out.decode(errors="replace")


def refusals(gw: GatewayMesh) -> list[dict[str, object]]:
    return [e for e in gw.logs if e.get("message") == "tls handshake failed"]


async def test_no_certificate_gets_certificate_required_alert_openssl(gw: GatewayMesh) -> None:
    out = await s_client(gw, "-tls1_3")
    assert "alert certificate required" in out, out
    assert "alert number 116" in out, out
    assert "HTTP/1.1" not in out, out
    (entry,) = refusals(gw)
    assert entry["error"] == "tls handshake failed: client certificate required (the client presented none)"
    assert entry["tls.alert_sent"] is True and entry["response_flags"] == "TLS_FAILURE"
    assert gw.seen == []


async def test_no_certificate_tls12_gets_handshake_failure_alert(gw: GatewayMesh) -> None:
    out = await s_client(gw, "-tls1_2")
    assert "alert handshake failure" in out and "alert number 40" in out, out
    assert "client certificate required" in str(refusals(gw)[0]["error"])


async def test_no_certificate_curl_shows_the_alert(gw: GatewayMesh) -> None:
    """curl sends its request right after its Finished: the lingering close keeps that request from
    turning the close into a reset that would destroy the alert (before: "unexpected eof")."""
    for _ in range(5):
        code, _, err = await gw.curl(None)
        assert code != 0 and "alert certificate required" in err, err
    assert len(refusals(gw)) == 5


async def test_no_certificate_stdlib_client_sees_the_alert(gw: GatewayMesh) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(gw.tmp / "server-ca.crt"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.mutual_port, ssl=ctx, server_hostname=HOST)
    try:
        writer.write(f"GET /data HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
        try:
            data = await asyncio.wait_for(reader.read(100), 5)
        except ssl.SSLError as exc:
            assert exc.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED", exc
        else:
            raise AssertionError(f"no alert, read {data!r}")
    finally:
        writer.transport.abort()


async def test_unknown_ca_gets_unknown_ca_alert(gw: GatewayMesh, tmp_path: Path) -> None:
    cert, key = gw.ext.client_unknown.write(tmp_path, "stranger")
    out = await s_client(gw, "-cert", str(cert), "-key", str(key))
    assert "alert unknown ca" in out and "alert number 48" in out, out
    (entry,) = refusals(gw)
    assert "client certificate refused: unable to get local issuer certificate" in str(entry["error"])


async def test_good_client_and_clean_close(gw: GatewayMesh, tmp_path: Path) -> None:
    cert, key = gw.ext.client_a.write(tmp_path, "partner")
    out = await s_client(gw, "-cert", str(cert), "-key", str(key))
    assert "HTTP/1.1 200" in out, out
    assert refusals(gw) == []


async def test_revoked_certificate_is_closed_with_close_notify(gw: GatewayMesh) -> None:
    """A refusal after the handshake (CRL, SAN list, CA-as-leaf: checks OpenSSL cannot make) ends the
    TLS session cleanly; the client never gets an HTTP answer, the reason is logged."""
    code, body, err = await gw.curl(gw.ext.client_revoked)
    assert code != 0 and "HTTP" not in body, (code, body, err)
    entries = [e for e in gw.logs if e.get("message") == "client certificate refused"]
    assert entries and "is revoked by" in str(entries[0]["error"]), gw.logs


async def test_large_upload_over_the_gateways_tls(gw: GatewayMesh, tmp_path: Path) -> None:
    """Many TLS records each way through `TlsChannel` (8 MiB up, HTTP/1.1 and HTTP/2)."""
    cert, key = gw.ext.client_a.write(tmp_path, "partner")
    body = tmp_path / "body.bin"
    body.write_bytes(os.urandom(8 * 1024 * 1024))
    for version in ("--http1.1", "--http2"):
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--max-time", "60", version, "--cacert", str(gw.tmp / "server-ca.crt"),
            "--resolve", f"{HOST}:{gw.mutual_port}:127.0.0.1", "--cert", str(cert), "--key", str(key),
            "--data-binary", f"@{body}", f"https://{HOST}:{gw.mutual_port}/data",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert json.loads(out)["body_bytes"] == 8 * 1024 * 1024, out[:300]
