"""CSRs served per second by the control plane's gRPC CA, over real mTLS on loopback (issue 6).

The control plane runs as its own process (`python -m zerotunnel control ...`), exactly as deployed; this
process enrols N simulated nodes with join tokens, then each node asks `CreateCertificate` with
`ImpersonatedIdentity` for pods scheduled on it, with C requests in flight in total, for a fixed time.
CSRs are made before timing (key generation is the node's cost). Next to it: the same authorization +
issuance called in-process (`CaService.create_certificate`), i.e. what gRPC/TLS/protobuf add.

Run: .venv/bin/python bench/bench_ca_grpc.py [--seconds 3] [--nodes 1,10] [--concurrency 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from zerotunnel.config import load
from zerotunnel.control.ca_service import CaService, node_identity
from zerotunnel.control.client import GrpcCaClient, enroll
from zerotunnel.control.tokens import TokenStore
from zerotunnel.identity.ca import CertificateAuthority
from zerotunnel.identity.csr import generate_key, make_csr
from zerotunnel.identity.spiffe import SpiffeId

PODS_PER_NODE = 4


def config_yaml(nodes: int) -> str:
    docs = []
    for n in range(nodes):
        for p in range(PODS_PER_NODE):
            docs.append(
                f"apiVersion: v1\nkind: Pod\nmetadata: {{name: p{n}-{p}, namespace: ns{n}}}\n"
                f"spec: {{serviceAccountName: sa{p}, nodeName: node-{n},"
                " containers: [{name: a, image: x}]}\n"
            )
    return "---\n".join(docs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def csrs_for(node: int, count: int) -> list[tuple[SpiffeId, bytes]]:
    out = []
    for i in range(count):
        ident = SpiffeId.istio("cluster.local", f"ns{node}", f"sa{i % PODS_PER_NODE}")
        out.append((ident, make_csr(ident, generate_key())))
    return out


async def grpc_rate(
    ca_addr: str, enrol_addr: str, state: Path, nodes: int, concurrency: int, seconds: float
) -> tuple[float, int]:
    root = (state / "ca" / "root-cert.pem").read_bytes()
    clients = []
    for n in range(nodes):
        token, _ = TokenStore(state).create(f"node-{n}", datetime.now(UTC))
        node_dir = state.parent / f"node-{n}-{concurrency}"
        await enroll(ca_addr, token, node_dir, root, enrol_address=enrol_addr)
        clients.append(GrpcCaClient(ca_addr, node_dir))
    pools = [csrs_for(n, 64) for n in range(nodes)]
    for client, pool in zip(clients, pools, strict=True):  # warm-up: channels connected, TLS done
        await client.sign(pool[0][0], pool[0][1], None)
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal done
        client, pool = clients[k % nodes], pools[k % nodes]
        i = k
        while time.perf_counter() < deadline:
            ident, csr = pool[i % len(pool)]
            await client.sign(ident, csr, None)
            done += 1
            i += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - start
    for client in clients:
        await client.close()
    return done / elapsed, done


def inprocess_rate(seconds: float) -> float:
    now = datetime.now(UTC)
    ca = CertificateAuthority.create_root("cluster.local", now)
    config = load([("pods.yaml", config_yaml(1))])
    service = CaService(lambda: ca, lambda: config)
    caller = node_identity("cluster.local", "node-0")
    pool = csrs_for(0, 64)
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        ident, csr = pool[count % len(pool)]
        service.create_certificate(caller, csr, 0, {"ImpersonatedIdentity": str(ident)}, now=now)
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--nodes", default="1,10")
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args()
    node_counts = [int(x) for x in args.nodes.split(",")]
    concurrencies = [int(x) for x in args.concurrency.split(",")]
    print(f"# {platform.machine()} {platform.processor() or ''} Python {platform.python_version()}")
    print(f"in-process CaService.create_certificate: {inprocess_rate(args.seconds):,.0f} CSR/s")
    print("| nodes | in flight | CSR/s over gRPC+mTLS | requests |")
    print("|---|---|---|---|")
    for nodes in node_counts:
        with tempfile.TemporaryDirectory(prefix="zt-bench-ca-") as tmp:
            root = Path(tmp)
            (root / "config").mkdir()
            (root / "config" / "pods.yaml").write_text(config_yaml(nodes))
            state = root / "state"
            ca_addr, enrol_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
            proc = subprocess.Popen(
                [sys.executable, "-m", "zerotunnel", "control", "--config", str(root / "config"),
                 "--state-dir", str(state), "--listen", ca_addr, "--enrol-listen", enrol_addr,
                 "--log-level", "error"],
            )
            try:
                while not (state / "status.json").exists():
                    if proc.poll() is not None:
                        raise SystemExit("control plane exited")
                    time.sleep(0.05)
                for c in concurrencies:
                    rate, total = asyncio.run(grpc_rate(ca_addr, enrol_addr, state, nodes, c, args.seconds))
                    print(f"| {nodes} | {c} | {rate:,.0f} | {total} |", flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)


if __name__ == "__main__":
    main()
