"""Policy bypass and spoofed identity headers, end to end (issue 9; security.md §1a, §1b, §4 items 6-7).

The set-up is tests/waypoint/test_waypoint_e2e.py's: real network namespaces and nftables capture, two
`zerotunnel node` processes, `zerotunnel waypoint` in its own pod, the demo app (which echoes every
header it received) as app-a, whose L4 policy admits only the waypoint. On top of the seed's
"GET /data from app-b", the waypoint holds (mesh path normalization DECODE_AND_MERGE_SLASHES):

- ALLOW app-b anything, DENY `paths: [/admin*]` for everyone (item 6: the DENY is the only guard);
- ALLOW app-c `GET /public` only (item 7: a spoofed identity header would widen app-c's access).

Requests are raw HTTP/1.1 bytes written by a small client inside app-b's / app-c's network namespace
to `app-a.namespace-a:80` (captured by the pod's nftables rules, carried by node-2's proxy over HBONE
to the waypoint), so every variant reaches the waypoint byte for byte, as an attacker would send it.

Pass: no variant of `/admin` is answered 200 with a backend path that any common backend would read
as `/admin` (0 bypasses; each is 403 or 400), every allowed request's backend path is the path the
waypoint decided on, app-c's spoofed identities never change its decision or the identity in the
waypoint's log, and app-a never sees an identity or internal header the client sent
(`x-forwarded-client-cert`, `x-spiffe-id`, `x-client-cert`, `ssl-client-cert`, `x-envoy-*`,
`x-istio-*`, `x-zerotunnel-*`). As in Envoy, `x-forwarded-for` is appended to (the real peer is
last), and `forwarded` and `baggage` are application data passed through unchanged: the figures
record what app-a received; nothing in the mesh reads them for identity (ztunnel: "baggage only for
telemetry"; here not even that — the waypoint's telemetry takes the source from the TLS peer).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from zerotunnel.cluster.network import create_network, destroy_network, write_hosts_file
from zerotunnel.cluster.topology import ServiceSpec, plan_network, pod_hosts
from zerotunnel.control.castore import init_root
from zerotunnel.node.capture import install_capture
from zerotunnel.testing.modules import load_by_path

wpe = load_by_path(
    Path(__file__).resolve().parents[1] / "waypoint" / "test_waypoint_e2e.py", "zt_bypass_waypoint_e2e"
)

pytestmark = wpe.pytestmark

B_ID = "spiffe://cluster.local/ns/namespace-b/sa/service-account-b"
C_ID = "spiffe://cluster.local/ns/namespace-c/sa/service-account-c"
HOST = "app-a.namespace-a"

POLICIES = """
apiVersion: zerotunnel.io/v1alpha1
kind: MeshConfig
spec: {pathNormalization: {normalization: DECODE_AND_MERGE_SLASHES}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-b-all, namespace: namespace-a}
spec:
  targetRefs: [{kind: Service, group: "", name: app-a}]
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/namespace-b/sa/service-account-b]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-c-public, namespace: namespace-a}
spec:
  targetRefs: [{kind: Service, group: "", name: app-a}]
  action: ALLOW
  rules:
    - from: [{source: {principals: [cluster.local/ns/namespace-c/sa/service-account-c]}}]
      to: [{operation: {methods: [GET], paths: [/public]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: namespace-a}
spec:
  targetRefs: [{kind: Service, group: "", name: app-a}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"""

CLIENT = r'''
import json, socket, sys
out = []
for raw in json.loads(sys.stdin.read()):
    s = socket.create_connection(("app-a.namespace-a", 80), timeout=8)
    s.sendall(raw.encode("latin-1"))
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        data += f"<{type(exc).__name__}>".encode()
    s.close()
    out.append(data.decode("latin-1"))
print(json.dumps(out))
'''


class Bypass:
    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def send(self, ns: str, pod: str, raws: list[str]) -> list[tuple[int | None, dict[str, Any] | str]]:
        """Each raw request on its own connection from inside `pod`; (status, echoed JSON or body)."""
        proc = subprocess.run(
            ["ip", "netns", "exec", self.cluster.plan.pod(ns, pod).netns, sys.executable, "-c", CLIENT],
            input=json.dumps(raws), capture_output=True, text=True, timeout=300, check=True,
        )
        out: list[tuple[int | None, dict[str, Any] | str]] = []
        for resp in json.loads(proc.stdout):
            m = re.match(r"HTTP/1\.1 (\d{3})", resp)
            body = resp.split("\r\n\r\n", 1)[1] if "\r\n\r\n" in resp else resp
            try:
                out.append((int(m.group(1)) if m else None, json.loads(body)))
            except ValueError:
                out.append((int(m.group(1)) if m else None, body))
        return out


def request(target: str, *, method: str = "GET", host: str = HOST, headers: list[str] | None = None,
            hosts: list[str] | None = None) -> str:
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"host: {h}" for h in (hosts if hosts is not None else [host])]
    lines += [*(headers or []), "connection: close"]
    return "\r\n".join(lines) + "\r\n\r\n"


def backend_view(path: str) -> str:
    """The most permissive reading a backend could make of a path: percent-decoded once (RFC 3986;
    a backend that decodes twice defeats every proxy, Envoy included), backslashes as slashes, slashes
    merged, dot segments removed, matrix parameters dropped, an absolute-form target's path."""
    path = re.sub(r"(?i)^https?:/+[^/]*", "", path) or "/"
    p = urllib.parse.unquote(path).replace("\\", "/")
    p = re.sub(r";[^/]*", "", p)
    p = re.sub(r"/{2,}", "/", p)
    out: list[str] = []
    for seg in p.split("/"):
        if seg == "..":
            if out:
                out.pop()
        elif seg not in (".", ""):
            out.append(seg)
    return "/" + "/".join(out) + ("/" if p.endswith("/") and out else "")


# security.md §4 item 6, against DENY paths:[/admin*] with everything else allowed for app-b.
ADMIN_VARIANTS = [
    ("plain", request("/admin")),
    ("double slash", request("//admin")),
    ("encoded slash upper", request("/%2Fadmin")),
    ("encoded slash lower", request("/%2fadmin")),
    ("encoded backslash", request("/%5cadmin")),
    ("backslash", request("\\admin")),
    ("dot segment", request("/./admin")),
    ("dot-dot", request("/x/../admin")),
    ("encoded dot-dot", request("/%2e%2e/admin")),
    ("public then dot-dot", request("/public/../admin")),
    ("encoded letter", request("/%61dmin")),
    ("trailing slash", request("/admin/")),
    ("matrix parameter", request("/admin;jsessionid=1")),
    ("fragment", request("/admin#x")),
    ("query", request("/admin?x")),
    ("NUL", request("/admin%00")),
    ("double-encoded NUL", request("/admin%2500")),
    ("lowercase method", request("/admin", method="get")),
    ("host case", request("/admin", host="App-A.Namespace-A")),
    ("host trailing dot", request("/admin", host="app-a.namespace-a.")),
    ("host with port", request("/admin", host="app-a.namespace-a:80")),
    ("duplicated host", request("/admin", hosts=[HOST, "other.example"])),
    ("no host", request("/admin", hosts=[])),
    ("absolute form", request("http://app-a.namespace-a/admin")),
    ("absolute form other host", request("http://other.example/admin")),
    ("absolute form upper scheme", request("HTTP://app-a.namespace-a//admin")),
    ("absolute form with userinfo", request("http://x@app-a.namespace-a/admin")),
    ("scheme-less target", request("app-a.namespace-a/admin")),
    ("authority with another IP", request("/admin", host="10.0.0.1:80")),
    ("spoofed original path", request("/public", headers=["x-envoy-original-path: /admin"])),
    ("double-encoded slash", request("/%252Fadmin")),
    ("absolute form allowed path", request("http://app-a.namespace-a/public?x=1")),
    ("tab in path", request("/ad\tmin")),
]

SPOOF_HEADERS = [
    f"x-forwarded-client-cert: By=spiffe://cluster.local/ns/namespace-a/sa/waypoint;URI={B_ID}",
    "x-forwarded-for: 10.0.0.66",
    f'forwarded: for=10.0.0.66;by="{B_ID}"',
    "baggage: k8s.namespace.name=namespace-b,k8s.deployment.name=app-b,service.name=app-b",
    f"x-spiffe-id: {B_ID}",
    f"x-client-cert: {B_ID}",
    f"ssl-client-cert: {B_ID}",
    f"x-envoy-peer-metadata-id: sidecar~10.0.0.66~app-b.namespace-b~{B_ID}",
    "x-envoy-original-path: /data",
    "x-envoy-internal: true",
    "x-forwarded-network: network-b",
    "x-istio-attributes: spoofed",
    "x-zerotunnel-src: spoofed",
]
UNTRUSTED = re.compile(r"^(x-forwarded-client-cert|x-spiffe-id|x-client-cert|ssl-client-cert|x-envoy-.*|"
                       r"x-istio-.*|x-zerotunnel-.*)$")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """test_waypoint_e2e.py's cluster with the policies above (a copy of its fixture: that one writes
    its config files itself)."""
    name = "b" + uuid.uuid4().hex[:6]
    tmp = tmp_path_factory.mktemp("bypass")
    plan = plan_network(name, ["node-1", "node-2"], wpe.PODS, [ServiceSpec("app-a", "namespace-a")],
                        pod_cidr="10.251.0.0/16", node_cidr="10.250.0.0/24", service_cidr="10.97.0.0/16")
    create_network(plan)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        config = tmp / "config"
        config.mkdir()
        mesh = (wpe.ROOT / "examples" / "seed" / "mesh.yaml").read_text().replace(
            "  name: namespace-a\n  labels:\n",
            "  name: namespace-a\n  labels:\n    istio.io/use-waypoint: waypoint\n",
        )
        (config / "mesh.yaml").write_text(mesh)
        (config / "waypoint.yaml").write_text((wpe.ROOT / "examples" / "seed" / "waypoint.yaml").read_text())
        (config / "l4.yaml").write_text(wpe.L4_POLICY)
        (config / "bypass.yaml").write_text(POLICIES)
        addresses = {
            "pod_ips": {f"{p.namespace}/{p.name}": str(p.ip) for p in plan.pods},
            "service_vips": {f"{s.namespace}/{s.name}": str(s.vip) for s in plan.services},
        }
        (tmp / "addresses.json").write_text(json.dumps(addresses))
        init_root(tmp / "ca", "cluster.local", datetime.now(UTC))
        for pod in plan.pods:
            write_hosts_file(pod.netns, pod_hosts(pod, plan.services))
        for spec in wpe.CAPTURED:
            install_capture(plan.pod(spec.namespace, spec.name).netns)
        common = ["-f", str(config), "--ca-dir", str(tmp / "ca"), "--addresses", str(tmp / "addresses.json"),
                  "--drain", "0.5"]
        for node in ("node-1", "node-2"):
            procs.append(wpe._spawn(
                ["ip", "netns", "exec", plan.node(node).netns, *wpe.ZT, "node", "--node", node, *common,
                 "--pod-api", str(tmp / f"{node}.sock")], tmp / f"{node}.log"))
        procs.append(wpe._spawn(
            ["ip", "netns", "exec", plan.pod("namespace-a", "waypoint").netns, *wpe.ZT, "waypoint",
             "--gateway", "namespace-a/waypoint", *common], tmp / "waypoint.log"))
        procs.append(wpe._spawn(
            ["ip", "netns", "exec", plan.pod("namespace-a", "app-a").netns, *wpe.ZT, "demo-app", "--port",
             "8080", "--name", "app-a"], tmp / "app-a.log"))
        deadline = time.monotonic() + 30
        for node in ("node-1", "node-2"):
            while not (tmp / f"{node}.sock").exists():
                assert time.monotonic() < deadline, f"{node} did not start"
                time.sleep(0.05)
        for spec in wpe.CAPTURED:
            pod = plan.pod(spec.namespace, spec.name)
            reply = wpe._podapi(tmp / f"{spec.node}.sock", {
                "op": "add", "uid": f"{spec.namespace}/{spec.name}", "netns": f"/run/netns/{pod.netns}",
                "ip": str(pod.ip)})
            assert reply.get("ok") is True, reply
        while "waypoint namespace-a/waypoint" not in (tmp / "waypoint.log").read_text():
            assert time.monotonic() < deadline, (tmp / "waypoint.log").read_text()[-2000:]
            time.sleep(0.1)
        yield wpe.Cluster(plan, tmp)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        destroy_network(name)


def _waypoint_requests(cluster: Any) -> list[dict[str, Any]]:
    return [x for x in cluster.log("waypoint") if x.get("message") == "request complete"]


def test_path_bypass_matrix(cluster: Any, figures: Any) -> None:
    client = Bypass(cluster)
    # app-b reaches app-a at all (else every 403 below would prove nothing)
    [(ok, echo)] = client.send("namespace-b", "app-b", [request("/public/x")])
    assert ok == 200 and isinstance(echo, dict) and echo["path"] == "/public/x", echo
    results = client.send("namespace-b", "app-b", [raw for _, raw in ADMIN_VARIANTS])
    rows: list[dict[str, Any]] = []
    bypasses = []
    for (case, _raw), (status, body) in zip(ADMIN_VARIANTS, results, strict=True):
        seen = body["path"] if isinstance(body, dict) else None
        rows.append({"case": case, "status": status, "backend_path": seen})
        if (status is None or status < 400) and (seen is None or backend_view(seen).startswith("/admin")):
            bypasses.append(rows[-1])
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[str(row["status"])] = statuses.get(str(row["status"]), 0) + 1
    figures(suite="bypass-e2e", matrix="paths/hosts (security.md §4 item 6)", variants=len(rows),
            bypasses=len(bypasses), statuses=statuses, rows=rows)
    assert bypasses == [], bypasses
    allowed = {  # not /admin to anyone: served, and the backend got the path the policy matched
        "spoofed original path": "/public",
        "double-encoded slash": "/%252Fadmin",
        "absolute form allowed path": "/public",
    }
    assert all(r["status"] in (400, 403) for r in rows if r["case"] not in allowed), rows
    for row in rows:
        if row["case"] in allowed:
            assert row["status"] == 200 and row["backend_path"] == allowed[row["case"]], row


def test_spoofed_identity_headers(cluster: Any, figures: Any) -> None:
    """security.md §4 item 7: app-c claims app-b's identity in every header a proxy or app might
    trust. The policy still sees app-c (GET /data 403, GET /public 200), the waypoint logs app-c, and
    app-a receives none of the identity/internal headers app-c sent."""
    client = Bypass(cluster)
    cases = [
        ("c /data with all spoofs", "namespace-c", "app-c", request("/data", headers=SPOOF_HEADERS), 403),
        ("c /public with all spoofs", "namespace-c", "app-c", request("/public", headers=SPOOF_HEADERS), 200),
        ("c /data plain", "namespace-c", "app-c", request("/data"), 403),
        ("b /admin with all spoofs", "namespace-b", "app-b", request("/admin", headers=SPOOF_HEADERS), 403),
        ("b /data with all spoofs", "namespace-b", "app-b", request("/data", headers=SPOOF_HEADERS), 200),
    ]
    for single in SPOOF_HEADERS:
        cases.append((f"c /data with {single.split(':')[0]}", "namespace-c", "app-c",
                      request("/data", headers=[single]), 403))
    before = len(_waypoint_requests(cluster))
    rows: list[dict[str, Any]] = []
    leaked: list[tuple[str, str]] = []
    for case, ns, pod, raw, expected in cases:
        [(status, body)] = client.send(ns, pod, [raw])
        headers: dict[str, Any] = body.get("headers", {}) if isinstance(body, dict) else {}
        for name, value in headers.items():
            if UNTRUSTED.match(name):
                leaked.append((case, f"{name}: {value}"))
        xff = headers.get("x-forwarded-for")
        rows.append({"case": case, "status": status, "expected": expected,
                     "backend_xff": xff, "backend_forwarded": headers.get("forwarded"),
                     "backend_baggage": headers.get("baggage")})
    time.sleep(1.0)  # the waypoint's access log is written after the response
    logged = _waypoint_requests(cluster)[before:]
    identities = sorted({str(x.get("src_identity")) for x in logged})
    wrong = [r for r in rows if r["status"] != r["expected"]]
    figures(suite="bypass-e2e", matrix="spoofed identity headers (security.md §4 item 7)", cases=len(rows),
            wrong_decisions=len(wrong), leaked_to_backend=leaked, logged_identities=identities, rows=rows)
    assert wrong == [], wrong
    assert leaked == [], leaked
    assert len(logged) >= len(cases), logged[-3:]
    assert all(x.get("src_identity") in (B_ID, C_ID) for x in logged), identities
    c_logged = [x for x in logged if x.get("src_identity") == C_ID]
    assert len(c_logged) == sum(1 for _, ns, *_ in cases if ns == "namespace-c"), identities
    # X-Forwarded-For is appended to (Envoy's behaviour), never replaced by the client's value alone.
    for row in rows:
        if row["status"] == 200:
            assert row["backend_xff"] and row["backend_xff"] != "10.0.0.66", row
