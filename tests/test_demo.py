"""The README's main job, `scripts/demo.sh`, run as a user would, from a clean state (e2e).

It must bring the seed scenario up, print the traffic matrix through app-a's waypoint (identities,
decision, reason, HTTP result), call the ingress gateway from the host with clients of two external CAs
(accepted, with the XFCC app-a saw) and of an unknown CA and a revoked certificate (refused, with the
reason), explain the seed's L7 policy with `analyze`, and leave nothing behind after its `zerotunnel down`
(the host veth and its routes included).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zerotunnel.cluster import netns, network, runner
from zerotunnel.cluster.state import STATE_ENV, ClusterDir

ROOT = Path(__file__).resolve().parents[1]
SA_A = "spiffe://cluster.local/ns/namespace-a/sa/service-account-a"
SA_B = "spiffe://cluster.local/ns/namespace-b/sa/service-account-b"
SA_C = "spiffe://cluster.local/ns/namespace-c/sa/service-account-c"
SA_WAYPOINT = "spiffe://cluster.local/ns/namespace-a/sa/waypoint"
GATEWAY_ID = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
WAYPOINT = "waypoint namespace-a/waypoint"
RBAC = "RBAC: access denied: allow policies exist, but none allowed"
GW = "examples/seed/gateway"


def lines(block: str) -> list[str]:
    """A result block's lines, without the indentation and the blank line that ends it."""
    out = []
    for line in block.splitlines():
        if not line.strip():
            break
        out.append(line.strip())
    return out


def curl(client: str, ip: str) -> str:
    key = f"{GW}/clients/{client}"
    return (f"curl --cacert {GW}/server-ca.crt --cert {key}.crt --key {key}.key "
            f"--resolve app-a.example.com:443:{ip} https://app-a.example.com/data")


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_main_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STATE_ENV, raising=False)
    runner.down("zerotunnel")  # a clean state: no cluster of that name, no leftovers
    env = {k: v for k, v in os.environ.items() if k != STATE_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    proc = subprocess.run([str(ROOT / "scripts" / "demo.sh")], capture_output=True, text=True, env=env,
                          timeout=280, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(r"cluster zerotunnel ready", out) and re.search(r"ready in \d+\.\d s", out)
    matrix, _, rest = out.partition("$ curl ")
    blocks = matrix.split("$ zerotunnel exec ")[1:]
    assert len(blocks) == 4, out
    get_b, post_b, other_b, get_c = (lines(b) for b in blocks)
    # app-b GET /data: allowed by the seed's L7 rule at the waypoint, delivered to app-a
    assert get_b == [
        "-n namespace-b app-b -- curl -s http://app-a.namespace-a/data",
        f"client identity  {SA_B}",
        f"server identity  {SA_A}  (namespace-a/app-a)",
        f"decision         ALLOW  (by {WAYPOINT})",
        "reason           allowed by: namespace-a/app-a-allow-get-data",
        "HTTP result      200",
    ], out
    # app-b POST /data and GET /other: the waypoint's 403, no policy allows them
    for block, request in ((post_b, "-X POST http://app-a.namespace-a/data"),
                           (other_b, "http://app-a.namespace-a/other")):
        assert block == [
            f"-n namespace-b app-b -- curl -s {request}",
            f"client identity  {SA_B}",
            f"server identity  {SA_WAYPOINT}  (namespace-a/waypoint)",
            f"decision         DENY  (by {WAYPOINT})",
            f"reason           {RBAC}",
            "HTTP result      403",
        ], out
    # app-c: refused at the waypoint as well (app-a's node proxy would also deny it: app-a-deny-app-c)
    assert get_c == [
        "-n namespace-c app-c -- curl -s http://app-a.namespace-a/data",
        f"client identity  {SA_C}",
        f"server identity  {SA_WAYPOINT}  (namespace-a/waypoint)",
        f"decision         DENY  (by {WAYPOINT})",
        f"reason           {RBAC}",
        "HTTP result      403",
    ], out
    # external clients from the host through the ingress gateway
    ingress = [lines("curl " + b) for b in ("$ curl " + rest).split("$ curl ")[1:]]
    assert len(ingress) == 4, out
    gw_ip = re.search(r"--resolve app-a\.example\.com:443:(\d+\.\d+\.\d+\.\d+) ", rest)
    assert gw_ip, out
    ip = gw_ip.group(1)
    assert re.search(rf"ingress gateway istio-system/istio-ingressgateway \(istio-system/app-a-gateway\) "
                     rf"reachable from the host at {re.escape(ip)} port 443 for app-a\.example\.com", out)
    for block, partner in zip(ingress[:2], ("partner-a", "partner-b"), strict=True):
        assert block[0] == curl(partner, ip), out
        assert block[1:5] + block[6:7] == [
            f"client cert      CN={partner}-client,O={partner}, issued by CN={partner} root CA,O={partner}",
            f"gateway          istio-system/istio-ingressgateway {ip}:443",
            "decision         ALLOW",
            "reason           allowed by: namespace-a/app-a-allow-ingress-get-data",
            "HTTP result      200",
        ], out
        assert re.fullmatch(
            rf"path             gateway istio-system/istio-ingressgateway -> {WAYPOINT} "
            rf"\(saw {re.escape(GATEWAY_ID)}\) -> namespace-a/app-a \({re.escape(SA_A)}, "
            r"HBONE to 10\.244\.\d+\.\d+:15008 with the waypoint's identity\)", block[5]), out
        assert re.fullmatch(rf"XFCC at app      By={re.escape(GATEWAY_ID)};Hash=[0-9a-f]{{64}};"
                            rf'Subject="CN={partner}-client,O={partner}";DNS=client\.{partner}\.example',
                            block[7]), out
        assert len(block) == 8, out
    stranger, revoked = ingress[2:]
    unknown_ca = "client certificate refused: unable to get local issuer certificate"
    for block, name, issuer, reason in ((stranger, "stranger", "stranger", unknown_ca),
                                        (revoked, "revoked", "partner-a", "client certificate serial ")):
        assert block[0] == curl(name, ip), out
        assert block[1] == (f"client cert      CN={name}-client,O={issuer}, "
                            f"issued by CN={issuer} root CA,O={issuer}"), out
        assert block[2:4] == [f"gateway          istio-system/istio-ingressgateway {ip}:443",
                              "decision         DENY"], out
        assert block[4].startswith(f"reason           {reason}"), out
        assert block[5] == ("path             refused at the gateway istio-system/istio-ingressgateway "
                            "(TLS handshake)"), out
        assert block[6].startswith("HTTP result      no response (curl exit "), out
        assert len(block) == 7, out
    assert "is revoked by CN=partner-a root CA,O=partner-a" in revoked[4]
    assert "ZT002" in out and "namespace-a/app-a-allow-app-b-only" in out  # analyze on the L7 policy
    assert "cluster zerotunnel removed" in out
    assert network.find_leftovers("zerotunnel").empty
    assert not [n for n in netns.list_netns() if n.startswith("zt-zerotunnel-")]
    assert not ClusterDir.for_cluster("zerotunnel").exists()
