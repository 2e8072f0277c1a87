"""Outside clients against a running local cluster's ingress gateway: accepted or refused, and why.

`python -m zerotunnel.cluster.ingress [--name CLUSTER] [-o json] --cacert CA [--expect D]… CERT=URL…`
(the main job, scripts/demo.sh; the seed's §8 case, issue 7). `CERT` names a client certificate and key
(`CERT.crt`, `CERT.key`). Each case runs the real `curl` on the host — a client outside the cluster —
against the gateway pod the URL's host is served by (`--resolve HOST:PORT:<gateway pod IP>`, which the
host reaches through the cluster's host veth), then reads what the proxies logged for it and prints:
- the client certificate's subject and issuer (which external CA it comes from);
- the decision: DENY when the gateway refused the handshake or the certificate (its log names the
  reason: unknown CA, revoked, expired, SAN not allowed), or when the waypoint answered 403; ALLOW
  when app-a answered; ERROR otherwise;
- the reason: the gateway's refusal, or the waypoint's decision (the policy that allowed or denied);
- the path the request took (gateway → waypoint, with the identity the waypoint saw → app-a) and the
  X-Forwarded-Client-Cert header app-a received, which describes the external client.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from zerotunnel.cluster import runner
from zerotunnel.cluster.state import DEFAULT_CLUSTER, ClusterDir
from zerotunnel.cluster.traffic import _log_sizes, _new_records, _source_label, report
from zerotunnel.errors import InputError, ZerotunnelError

LOG_WAIT = 3.0
REFUSALS = ("tls handshake failed", "client certificate refused")


@dataclass(frozen=True, slots=True)
class IngressResult:
    client: str
    url: str
    command: str
    certificate: str
    gateway: str
    decision: str
    reason: str
    path: str
    http: str
    xfcc: str


def parse_case(text: str) -> tuple[str, str]:
    """`CERT=URL` → (CERT, URL); CERT.crt and CERT.key must exist."""
    cert, sep, url = text.partition("=")
    if not sep or not cert or not url.startswith(("https://", "http://")):
        raise InputError(f"a case is CERT=URL (CERT.crt and CERT.key name the client), got {text!r}")
    for suffix in (".crt", ".key"):
        if not Path(cert + suffix).is_file():
            raise InputError(f"{cert}{suffix}: no such file")
    return cert, url


def describe_certificate(path: Path) -> str:
    """`subject, issued by issuer` of a PEM certificate (the external CA it comes from)."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return f"{cert.subject.rfc4514_string()}, issued by {cert.issuer.rfc4514_string()}"


def pick_gateway(status: dict[str, Any], host: str) -> dict[str, Any]:
    """The gateway pod serving `host` (a Gateway server's host, `*` or `*.suffix`), else the only one."""
    gateways = [g for g in status.get("gateways", []) if isinstance(g, dict)]
    if not gateways:
        raise InputError("the cluster runs no ingress gateway pod (`zerotunnel gateway`)")

    def serves(g: dict[str, Any]) -> bool:
        return any(h in ("*", host) or (h.startswith("*.") and host.endswith(h[1:]))
                   for h in g.get("hosts", []))

    matching = [g for g in gateways if serves(g)] or gateways
    return matching[0]


def run_case(cluster: str, status: dict[str, Any], cert: str, url: str, cacert: str,
             *, timeout: float = 10.0) -> IngressResult:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    gw = pick_gateway(status, host)
    cdir = ClusterDir.for_cluster(cluster)
    gw_log = cdir.pod_log(gw["namespace"], gw["pod"])
    logs = [gw_log, *(cdir.node_log(n["name"]) for n in status.get("nodes", []))]
    logs += [cdir.pod_log(p["namespace"], p["name"]) for p in status.get("pods", []) if p.get("waypoint_of")]
    sizes = _log_sizes(logs)
    argv = ["curl", "-sS", "--max-time", f"{timeout:g}", "--cacert", cacert, "--cert", f"{cert}.crt",
            "--key", f"{cert}.key", "--resolve", f"{host}:{port}:{gw['ip']}"]
    shown = " ".join([*argv[:1], *argv[4:], url])
    proc = subprocess.run([*argv, "-w", "\n%{http_code}", url], capture_output=True, text=True,
                          timeout=timeout + 10, check=False)
    body, _, code = proc.stdout.rpartition("\n")
    got_response = proc.returncode == 0 and code.isdigit() and code != "000"
    http = code if got_response else f"no response (curl exit {proc.returncode}: {proc.stderr.strip()})"
    gw_label = f"{gw['namespace']}/{gw['pod']} {gw['ip']}:{port}"
    gw_source = _source_label(gw_log)
    deadline = time.monotonic() + LOG_WAIT
    records: list[tuple[str, dict[str, Any]]] = []
    while time.monotonic() < deadline:
        records = _new_records(sizes)
        done = any(r.get("message") == "request complete" and n != gw_source for n, r in records)
        if done or any(r.get("message") in REFUSALS for _, r in records):
            break
        time.sleep(0.05)
    refused = [r for n, r in records if n == gw_source and r.get("message") in REFUSALS]
    waypoint = [(n, r) for n, r in records if r.get("message") == "request complete" and n != gw_source]
    xfcc = "-"
    echo: dict[str, Any] = {}
    if got_response:
        try:
            parsed = json.loads(body)
            echo = parsed if isinstance(parsed, dict) else {}
        except ValueError:
            echo = {}
        headers = echo.get("headers") if isinstance(echo.get("headers"), dict) else {}
        xfcc = str((headers or {}).get("x-forwarded-client-cert", "-"))
    wp = waypoint[-1][1] if waypoint else {}
    hops = [f"gateway {gw['namespace']}/{gw['pod']}"]
    if waypoint:
        hops.append(f"{waypoint[-1][0]} (saw {wp.get('src_identity', '?')})")
    if wp.get("response_code_details") == "via_upstream" and wp.get("dst_workload"):
        hops.append(f"{wp.get('dst_namespace')}/{wp['dst_workload']} ({wp.get('dst_identity')}, "
                    f"HBONE to {wp.get('upstream_host')} with the waypoint's identity)")
    elif echo.get("name"):
        hops.append(str(echo["name"]))
    if refused:
        decision, reason = "DENY", str(refused[-1].get("error", "refused"))
        hops = [f"refused at the gateway {gw['namespace']}/{gw['pod']} (TLS handshake)"]
    elif got_response and code in ("401", "403"):
        decision = "DENY"
        said = body.strip()
        reason = f"{said}: {wp['reason']}" if wp.get("reason") and said else (
            str(wp.get("reason") or said or f"HTTP {code}"))
    elif got_response and code.startswith("2"):
        decision = "ALLOW"
        reason = str(wp.get("reason") or "answered (no waypoint on the way)")
    else:
        decision = "ERROR"
        reason = str(wp.get("reason") or proc.stderr.strip() or f"HTTP {code}")
    return IngressResult(Path(cert).name, url, shown, describe_certificate(Path(f"{cert}.crt")), gw_label,
                         decision, reason, " -> ".join(hops), http, xfcc)


def render(results: list[IngressResult]) -> str:
    out = []
    for r in results:
        out += [
            f"$ {r.command}",
            f"  client cert      {r.certificate}",
            f"  gateway          {r.gateway}",
            f"  decision         {r.decision}",
            f"  reason           {r.reason}",
            f"  path             {r.path}",
            f"  HTTP result      {r.http}",
        ]
        if r.xfcc != "-":
            out.append(f"  XFCC at app      {r.xfcc}")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zerotunnel.cluster.ingress",
                                     description="Call the ingress gateway from the host with client "
                                                 "certificates and explain each decision.")
    parser.add_argument("--name", default=DEFAULT_CLUSTER, help="cluster name")
    parser.add_argument("-o", "--output", choices=["text", "json"], default="text")
    parser.add_argument("--cacert", required=True, help="the CA that signed the gateway's server certificate")
    parser.add_argument("--expect", action="append", default=[], metavar="DECISION",
                        help="expected decision of each case, in order (ALLOW/DENY); exit 1 on a mismatch")
    parser.add_argument("cases", nargs="+", metavar="CERT=URL")
    args = parser.parse_intermixed_args(argv)
    if args.expect and len(args.expect) != len(args.cases):
        parser.error("give one --expect per case")
    try:
        status = runner.cluster_status(args.name, live=False)
        results = [run_case(args.name, status, *parse_case(c), args.cacert) for c in args.cases]
    except ZerotunnelError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return report(results, args.expect, args.output, render(results), lambda r: f"{r.client} -> {r.url}")


if __name__ == "__main__":
    sys.exit(main())
