"""A traffic matrix against a running local cluster: who called whom, what was decided, and why.

`python -m zerotunnel.cluster.traffic [--name CLUSTER] [-o json] CLIENT=[METHOD ]URL ...` (the main
job, scripts/demo.sh). For each case it runs `zerotunnel exec -n NS POD -- curl … URL` in the client pod —
the request goes through the pod's real capture and its node proxies — then reads the access-log
lines the node proxies wrote for that connection (spec istio-ambient.md §8.2) and prints:
- client and server identity, as the proxies saw them on the mTLS connection;
- the decision: DENY when a proxy logged a policy rejection (its `error` names the policy), ALLOW
  when the request reached the server, ERROR when it failed for another reason;
- the reason: the proxy's own error for a denial; for an allow, what `zerotunnel authz check`
  (policy.explain) says about the same connection, since proxies do not log why they allowed;
- the HTTP result curl got.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from zerotunnel.cluster import runner
from zerotunnel.cluster.state import DEFAULT_CLUSTER, ClusterDir, config_files
from zerotunnel.errors import InputError, ZerotunnelError
from zerotunnel.policy.explain import CheckQuery, explain

LOG_WAIT = 3.0
POLICY_REJECTION = "policy rejection"
RBAC_DENIED = "RBAC: access denied"


@dataclass(frozen=True, slots=True)
class Result:
    client: str
    url: str
    command: str
    client_identity: str
    server: str
    server_identity: str
    decision: str
    reason: str
    http: str
    enforced_by: str
    method: str = "GET"


def parse_case(text: str) -> tuple[str, str]:
    """`NS/POD=URL` (or `NS/POD=METHOD URL`) → (NS/POD, URL or `METHOD URL`)."""
    client, sep, url = text.partition("=")
    if not sep or "/" not in client or not url:
        raise InputError(f"a case is NAMESPACE/POD=[METHOD ]URL, got {text!r}")
    split_method(url)
    return client, url


def split_method(target: str) -> tuple[str, str]:
    """`POST http://…` → ("POST", "http://…"); a bare URL is a GET. The method is what the seed's
    L7 rule distinguishes (GET /data allowed, POST /data denied at the waypoint)."""
    method, sep, url = target.partition(" ")
    if not sep:
        return "GET", target
    if not method.isalpha() or not method.isupper() or not url.strip():
        raise InputError(f"a request is [METHOD ]URL with METHOD in capitals, got {target!r}")
    return method, url.strip()


def _log_sizes(paths: list[Path]) -> dict[Path, int]:
    out = {}
    for p in paths:
        try:
            out[p] = p.stat().st_size
        except OSError:
            out[p] = 0
    return out


def _source_label(path: Path) -> str:
    """`node proxy NODE` for logs/node-NODE.log, `waypoint NS/POD` for logs/pod-NS.POD.log."""
    if path.stem.startswith("node-"):
        return f"node proxy {path.stem.removeprefix('node-')}"
    return "waypoint " + path.stem.removeprefix("pod-").replace(".", "/", 1)


def _new_records(sizes: dict[Path, int]) -> list[tuple[str, dict[str, Any]]]:
    """Access-log records appended since `sizes` was taken, with the node whose log had them."""
    out = []
    for path, size in sizes.items():
        try:
            with path.open("rb") as f:
                f.seek(size)
                data = f.read()
        except OSError:
            continue
        node = _source_label(path)
        for line in data.decode(errors="replace").splitlines():
            start = line.find("{")
            if start < 0:
                continue
            try:
                rec = json.loads(line[start:])
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("target") == "access":
                out.append((node, rec))
    return out


def _mine(records: list[tuple[str, dict[str, Any]]], client_ip: str) -> list[tuple[str, dict[str, Any]]]:
    def src_ip(rec: dict[str, Any]) -> str:
        addr = str(rec.get("src.addr") or rec.get("src_addr") or "")
        return addr.rsplit(":", 1)[0].strip("[]")
    return [(n, r) for n, r in records if src_ip(r) == client_ip]


def run_case(cluster: str, status: dict[str, Any], client: str, target: str, *,
             timeout: float = 5.0) -> Result:
    method, url = split_method(target)
    ns, _, pod_name = client.partition("/")
    pod = runner.find_pod(status, pod_name, ns)
    cdir = ClusterDir.for_cluster(cluster)
    logs = [cdir.node_log(n["name"]) for n in status.get("nodes", [])]
    logs += [cdir.pod_log(p["namespace"], p["name"]) for p in status.get("pods", []) if p.get("waypoint_of")]
    sizes = _log_sizes(logs)
    opts = [] if method == "GET" else ["-X", method]
    curl = ["curl", "-s", *opts, "-w", "\n%{http_code}", "--max-time", f"{timeout:g}", url]
    name_opt = [] if cluster == DEFAULT_CLUSTER else ["--name", cluster]
    argv = [sys.executable, "-m", "zerotunnel.cli.main", "exec", *name_opt, "-n", ns, pod_name, "--", *curl]
    shown = f"zerotunnel exec -n {ns} {pod_name} -- curl -s {' '.join([*opts, url])}"
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, check=False)
    body, _, code = proc.stdout.rpartition("\n")
    got_response = proc.returncode == 0 and code.isdigit() and code != "000"
    http = f"{code}" if got_response else f"no response (curl exit {proc.returncode})"
    records: list[tuple[str, dict[str, Any]]] = []
    deadline = time.monotonic() + (LOG_WAIT if pod.get("ambient") or not got_response else 1.0)
    while time.monotonic() < deadline:
        records = _mine(_new_records(sizes), str(pod.get("ip")))
        if any(r.get("direction") == "inbound" for _, r in records) or (
                records and any(POLICY_REJECTION in str(r.get("error", "")) for _, r in records)):
            break
        time.sleep(0.05)
    waypoint = [(n, r) for n, r in records if r.get("message") == "request complete"]
    records = [(n, r) for n, r in records if (n, r) not in waypoint]
    inbound = [(n, r) for n, r in records if r.get("direction") == "inbound"]
    outbound = [(n, r) for n, r in records if r.get("direction") == "outbound"]
    chosen = inbound[-1] if inbound else (outbound[-1] if outbound else None)
    rec = chosen[1] if chosen else {}
    wp = waypoint[-1][1] if waypoint else {}
    client_identity = str(rec.get("src.identity") or wp.get("src_identity")
                          or (pod.get("identity") if pod.get("ambient") else "")
                          or "none (plaintext: the client is outside the mesh)")
    known = rec.get("dst.workload") and rec.get("dst.namespace")
    server = f"{rec['dst.namespace']}/{rec['dst.workload']}" if known else (urlsplit(url).hostname or url)
    if wp.get("dst_workload") and wp.get("dst_namespace"):
        server = f"{wp['dst_namespace']}/{wp['dst_workload']}"
    server_identity = str(wp.get("dst_identity") or rec.get("dst.identity")
                          or "none (no proxy served the server side)")
    denial = next((r for _, r in records if POLICY_REJECTION in str(r.get("error", ""))), None)
    enforced = f"{chosen[0]} ({rec.get('direction')})" if chosen else "no node proxy saw it"
    if waypoint:
        enforced = waypoint[-1][0]
    if denial is not None:
        decision, reason = "DENY", str(denial["error"])
        enforced = next((f"{n} ({r.get('direction')})" for n, r in records if r is denial), enforced)
    elif got_response and (wp.get("response_code") in (401, 403) or body.startswith(RBAC_DENIED)):
        # §6.2: a waypoint denies with 403 `RBAC: access denied` (401 for a missing/invalid JWT)
        decision = "DENY"
        said = body.strip()
        reason = f"{said}: {wp['reason']}" if wp.get("reason") and said else (
            str(wp.get("reason") or said or f"HTTP {code}"))
        if wp.get("policy") and str(wp["policy"]) not in reason:
            reason += f" (policy {wp['policy']})"
    elif got_response:
        decision = "ALLOW"
        reason = str(wp["reason"]) if wp.get("reason") else _explain_allow(status, pod, rec, url)
    else:
        decision = "ERROR"
        errors = [str(r["error"]) for _, r in records if r.get("error")]
        reason = errors[-1] if errors else (proc.stderr.strip() or "no response and no proxy error logged")
    return Result(client, url, shown, client_identity, server, server_identity, decision, reason, http,
                  enforced, method)


def _explain_allow(status: dict[str, Any], pod: dict[str, Any], rec: dict[str, Any], url: str) -> str:
    """Why it was allowed, from the same policies the proxies enforce (`authz check`)."""
    dst_ns, dst_name = rec.get("dst.namespace"), rec.get("dst.workload")
    if not dst_ns or not dst_name:
        return "no node proxy enforced anything on this connection"
    try:
        config = runner.load_config(config_files(list(status.get("config_paths", []))))
        port_text = str(rec.get("dst.hbone_addr", "")).rsplit(":", 1)[-1]
        q = CheckQuery(
            to=f"{dst_ns}/{dst_name}", port=int(port_text) if port_text.isdigit() else None,
            from_pod=f"{pod['namespace']}/{pod['name']}" if pod.get("ambient") else None,
            from_plaintext=not pod.get("ambient"), from_ip=str(pod.get("ip")),
            path=urlsplit(url).path or "/",
        )
        return explain(config, q, now=datetime.now(UTC)).reason
    except (ZerotunnelError, ValueError) as exc:
        return f"allowed (could not explain: {exc})"


def report(results: Sequence[Any], expect: Sequence[str] | None, output: str, table: str,
           describe: Callable[[Any], str]) -> int:
    """Print the results (JSON or `table`) and each one whose decision is not the `--expect`ed one;
    the exit status: 1 if any was unexpected (`traffic` and `ingress` share it)."""
    if output == "json":
        print(json.dumps([asdict(r) for r in results], indent=1))
    else:
        print(table)
    wrong = [f"{describe(r)}: {r.decision}, expected {e.upper()}"
             for r, e in zip(results, expect or [], strict=False) if r.decision != e.upper()]
    for w in wrong:
        print(f"unexpected: {w}", file=sys.stderr)
    return 1 if wrong else 0


def render(results: list[Result]) -> str:
    out = []
    for r in results:
        out += [
            f"$ {r.command}",
            f"  client identity  {r.client_identity}",
            f"  server identity  {r.server_identity}  ({r.server})",
            f"  decision         {r.decision}  (by {r.enforced_by})",
            f"  reason           {r.reason}",
            f"  HTTP result      {r.http}",
            "",
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zerotunnel.cluster.traffic",
                                     description="Send requests between pods and explain each decision.")
    parser.add_argument("--name", default=DEFAULT_CLUSTER, help="cluster name")
    parser.add_argument("-o", "--output", choices=["text", "json"], default="text")
    parser.add_argument("--expect", action="append", default=[], metavar="DECISION",
                        help="expected decision of each case, in order (ALLOW/DENY); exit 1 on a mismatch")
    parser.add_argument("cases", nargs="+", metavar="NS/POD=URL")
    args = parser.parse_intermixed_args(argv)
    if args.expect and len(args.expect) != len(args.cases):
        parser.error("give one --expect per case")
    try:
        status = runner.cluster_status(args.name, live=False)
        results = [run_case(args.name, status, *parse_case(c)) for c in args.cases]
    except ZerotunnelError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return report(results, args.expect, args.output, render(results),
                  lambda r: f"{r.client} -> {r.method} {r.url}")


if __name__ == "__main__":
    sys.exit(main())
