"""CSRs served per second by the control plane's gRPC CA, over real mTLS on loopback (issue 6).

The control plane runs as its own process (`python -m zerotunnel control ...`), exactly as deployed; this
process enrols N simulated nodes with join tokens, then each node asks `CreateCertificate` with
`ImpersonatedIdentity` for pods scheduled on it, with C requests in flight in total, for a fixed time.
CSRs are made before timing (key generation is the node's cost). Next to it: the same authorization +
issuance called in-process (`CaService.create_certificate`), i.e. what gRPC/TLS/protobuf add.

With `--push`: the time from a config edit (a new AuthorizationPolicy file in the watched directory) to
every simulated node having applied and ACKed the new snapshot, for 1, 10 and 100 nodes (each node is a
`ConfigSubscription` on its own mTLS channel, all in this process).

Run: .venv/bin/python bench/bench_ca_grpc.py [--seconds 3] [--nodes 1,10] [--concurrency 1,8,32]
     .venv/bin/python bench/bench_ca_grpc.py --push [--nodes 1,10,100] [--edits 3]
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

import grpc

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


async def push_latency(
    ca_addr: str, enrol_addr: str, state: Path, config_dir: Path, nodes: int, edits: int
) -> list[tuple[float, float]]:
    """Per edit: (median node, slowest node) seconds from the file write to the snapshot's arrival.

    Each simulated node is a raw ADS stream on its own mTLS channel that ACKs on arrival: what is timed
    is the control plane (watch, reload, snapshot, push to every node); the node's own `config.load`
    of the snapshot is timed separately (`node_apply_seconds`), as every real node does it in its own
    process while 100 in this one would queue behind each other.
    """
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    from zerotunnel.control.client import SNAPSHOT_TYPE

    root = (state / "ca" / "root-cert.pem").read_bytes()
    arrived: dict[int, dict[int, float]] = {}
    clients = []
    for n in range(nodes):
        token, _ = TokenStore(state).create(f"node-{n}", datetime.now(UTC))
        node_dir = state.parent / f"push-node-{n}"
        await enroll(ca_addr, token, node_dir, root, enrol_address=enrol_addr)
        clients.append(GrpcCaClient(ca_addr, node_dir))

    async def node(n: int, client: GrpcCaClient) -> None:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(client.channel()).StreamAggregatedResources()
        hello = discovery_pb2.DiscoveryRequest(type_url=SNAPSHOT_TYPE, node=base_pb2.Node(id=str(n)))
        await call.write(hello)
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            arrived.setdefault(int(response.version_info), {})[n] = time.perf_counter()
            await call.write(discovery_pb2.DiscoveryRequest(
                type_url=SNAPSHOT_TYPE, version_info=response.version_info, response_nonce=response.nonce
            ))

    tasks = [asyncio.create_task(node(n, c)) for n, c in enumerate(clients)]

    async def all_at(version: int) -> None:
        while len(arrived.get(version, {})) < nodes:
            await asyncio.sleep(0.002)

    await asyncio.wait_for(all_at(1), 60)
    results = []
    for e in range(edits):
        await asyncio.sleep(0.5)
        start = time.perf_counter()
        (config_dir / f"policy-{e}.yaml").write_text(
            f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: p{e}, namespace: ns0}}\nspec: {{action: DENY, rules: [{{}}]}}\n"
        )
        await asyncio.wait_for(all_at(e + 2), 60)
        lat = sorted(t - start for t in arrived[e + 2].values())
        results.append((lat[len(lat) // 2], lat[-1]))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in clients:
        await client.close()
    return results


def node_apply_seconds(config_dir: Path) -> float:
    """What one node spends turning the snapshot into a Config (decode + validate), best of 3."""
    from zerotunnel.control.client import loader_input
    from zerotunnel.control.files import read_config_paths
    from zerotunnel.control.server import _node_documents

    docs = [(d.name, d.json) for d in _node_documents(read_config_paths([config_dir]))]
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        load(loader_input(docs))
        best = min(best, time.perf_counter() - t)
    return best


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
    parser.add_argument("--push", action="store_true", help="measure config edit → all nodes acked")
    parser.add_argument("--edits", type=int, default=3)
    args = parser.parse_args()
    if args.push:
        push_main([int(x) for x in (args.nodes if args.nodes != "1,10" else "1,10,100").split(",")],
                  args.edits)
        return
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
                 "--log-level", "error", "--metrics-listen", "off"],
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


def start_plane(root: Path, nodes: int) -> tuple[subprocess.Popen[bytes], Path, str, str]:
    (root / "config").mkdir()
    (root / "config" / "pods.yaml").write_text(config_yaml(nodes))
    state = root / "state"
    ca_addr, enrol_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "zerotunnel", "control", "--config", str(root / "config"),
         "--state-dir", str(state), "--listen", ca_addr, "--enrol-listen", enrol_addr,
         "--log-level", "error", "--metrics-listen", "off"],
    )
    while not (state / "status.json").exists():
        if proc.poll() is not None:
            raise SystemExit("control plane exited")
        time.sleep(0.05)
    return proc, state, ca_addr, enrol_addr


def push_main(node_counts: list[int], edits: int) -> None:
    print(f"# {platform.machine()} Python {platform.python_version()}; config edit → snapshot at every node")
    print("| nodes | pods | edit | median node (s) | all nodes (s) | + one node's load of the snapshot (s) |")
    print("|---|---|---|---|---|---|")
    for nodes in node_counts:
        with tempfile.TemporaryDirectory(prefix="zt-bench-push-") as tmp:
            proc, state, ca_addr, enrol_addr = start_plane(Path(tmp), nodes)
            config_dir = Path(tmp) / "config"
            try:
                rows = asyncio.run(push_latency(ca_addr, enrol_addr, state, config_dir, nodes, edits))
                apply = node_apply_seconds(config_dir)
                for i, (median, slowest) in enumerate(rows, 1):
                    pods = nodes * PODS_PER_NODE
                    row = f"| {nodes} | {pods} | {i} | {median:.3f} | {slowest:.3f} | {apply:.3f} |"
                    print(row, flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)


if __name__ == "__main__":
    main()
