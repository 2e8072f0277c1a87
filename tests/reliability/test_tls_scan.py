"""TLS surface of 15008 scanned with a real scanner: sslyze (security.md §4 item 31, §2h, rules 5-6).

sslyze pins `cryptography<47` while the project uses 48, so it lives in its own virtualenv
(`python3 -m venv /opt/sslyze && /opt/sslyze/bin/pip install sslyze==6.3.1`, or `$ZT_SSLYZE` pointing
at an `sslyze` executable) and is driven through its CLI's JSON output. Two scans: without a client
certificate (the scanner must find client authentication REQUIRED), and with a mesh SVID so every
plugin can complete. The few properties the scanner cannot see on a TLS-1.3-only server (tickets
sent after the handshake, ALPN enforcement) are checked with the stdlib client next to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import ssl
import tempfile
from pathlib import Path
from typing import Any

import pytest

from zerotunnel.node.tls import client_context

SCANS = ["--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2", "--tlsv1_3", "--resum", "--compression",
         "--reneg", "--early_data", "--heartbleed", "--robot", "--fallback", "--elliptic_curves", "--ems"]
LEGACY = ("ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites", "tls_1_2_cipher_suites")
AEAD_ONLY = {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"}  # ztunnel's two suites (§2a)


def _sslyze() -> str:
    for candidate in (os.environ.get("ZT_SSLYZE"), "/opt/sslyze/bin/sslyze", shutil.which("sslyze")):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail("sslyze not found: python3 -m venv /opt/sslyze && /opt/sslyze/bin/pip install sslyze==6.3.1 "
                "(or set ZT_SSLYZE)")


async def _scan(address: tuple[str, int], args: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scan.json"
        proc = await asyncio.create_subprocess_exec(
            _sslyze(), "--mozilla_config", "disable", *args, f"--json_out={out}",
            f"{address[0]}:{address[1]}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        log, _ = await proc.communicate()
        assert out.exists(), log.decode()[-2000:]
        result: dict[str, Any] = json.loads(out.read_text())["server_scan_results"][0]
        return result


def _accepted(scan: dict[str, Any], name: str) -> list[str]:
    entry = scan["scan_result"][name]
    assert entry["status"] == "COMPLETED", (name, entry)
    return [c["cipher_suite"]["name"] for c in entry["result"]["accepted_cipher_suites"]]


@pytest.mark.slow
def test_sslyze_scan_of_15008(env: Any, figures: Any) -> None:
    async def main() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        server = await env.server()
        anonymous = await _scan(server.address, ["--tlsv1_3", "--tlsv1_2"])
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert.write_bytes(env.client_creds.chain_pem)
            key.write_bytes(env.client_creds.key_pem)
            key.chmod(0o600)
            full = await _scan(server.address, ["--cert", str(cert), "--key", str(key), *SCANS])
        stdlib = await _stdlib_checks(env, server.address)
        await env.aclose()
        return anonymous, full, stdlib

    anonymous, full, stdlib = asyncio.run(asyncio.wait_for(main(), 180))
    res = full["scan_result"]
    summary = {
        "client_auth": anonymous["connectivity_result"]["client_auth_requirement"],
        "highest": full["connectivity_result"]["highest_tls_version_supported"],
        "tls13_suites": _accepted(full, "tls_1_3_cipher_suites"),
        "tls12_and_below": {n: _accepted(full, n) for n in LEGACY},
        "sslv2_status": res["ssl_2_0_cipher_suites"]["status"],
        "compression": res["tls_compression"]["result"],
        "renegotiation": res["session_renegotiation"]["result"],
        "resumption": res["session_resumption"]["result"],
        "early_data": res["tls_1_3_early_data"]["status"],
        "early_data_result": res["tls_1_3_early_data"]["result"],
        "heartbleed": res["heartbleed"]["result"],
        "robot": res["robot"]["result"],
        "curves": [c["name"] for c in res["elliptic_curves"]["result"]["supported_curves"]],
        **stdlib,
    }
    figures(**summary)
    assert summary["client_auth"] == "REQUIRED", summary
    assert _accepted(anonymous, "tls_1_2_cipher_suites") == [], summary
    assert summary["highest"] == "TLS_1_3", summary
    assert set(summary["tls13_suites"]) == AEAD_ONLY, summary  # no ChaCha20, no CCM (§2a)
    assert all(v == [] for v in summary["tls12_and_below"].values()), summary
    # nassl cannot speak SSLv2 to an OpenSSL 3 server at all: an error here means "no SSLv2"
    assert summary["sslv2_status"] in ("COMPLETED", "ERROR"), summary
    if summary["sslv2_status"] == "COMPLETED":
        assert _accepted(full, "ssl_2_0_cipher_suites") == [], summary
    assert summary["compression"] == {"supports_compression": False}, summary
    assert summary["renegotiation"]["client_renegotiations_success_count"] == 0, summary
    assert not summary["renegotiation"]["is_vulnerable_to_client_renegotiation_dos"], summary
    assert summary["resumption"]["session_id_successful_resumptions_count"] == 0, summary
    assert summary["resumption"]["tls_ticket_successful_resumptions_count"] == 0, summary
    # 0-RTT needs a resumable session first; with no tickets the probe cannot even get one (ERROR)
    assert summary["early_data"] == "ERROR" or summary["early_data_result"] == {"supports_early_data": False}
    assert summary["heartbleed"] == {"is_vulnerable_to_heartbleed": False}, summary
    assert summary["robot"]["robot_result"].startswith("NOT_VULNERABLE"), summary
    assert summary["tickets_received"] == 0 and not summary["session_has_ticket"], summary
    assert summary["no_cert_refused"] and summary["wrong_alpn_refused"], summary


async def _stdlib_checks(env: Any, address: tuple[str, int]) -> dict[str, Any]:
    """What a TLS-1.3-only scan cannot see: NewSessionTicket count (rule 5: none), a handshake with
    no client certificate (refused with an alert), ALPN other than h2 (refused after the handshake)."""
    out: dict[str, Any] = {}
    ctx = client_context(env.client_creds)
    reader, writer = await asyncio.open_connection(*address, ssl=ctx, server_hostname="")
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reader.read(1024), 0.5)
    sslobj = writer.get_extra_info("ssl_object")
    session = sslobj.session
    out["session_has_ticket"] = bool(session and session.has_ticket)
    out["tickets_received"] = int(session.has_ticket) if session else 0
    writer.close()

    async def refused(ctx: ssl.SSLContext) -> bool:
        try:
            reader, writer = await asyncio.open_connection(*address, ssl=ctx, server_hostname="")
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            data = await asyncio.wait_for(reader.read(1024), 2.0)
            writer.close()
            return data == b""
        except (ssl.SSLError, ConnectionError, OSError):
            return True

    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.verify_mode = ssl.CERT_NONE
    bare.set_alpn_protocols(["h2"])
    out["no_cert_refused"] = await refused(bare)
    other_alpn = client_context(env.client_creds)
    other_alpn.set_alpn_protocols(["http/1.1"])
    out["wrong_alpn_refused"] = await refused(other_alpn)
    return out
