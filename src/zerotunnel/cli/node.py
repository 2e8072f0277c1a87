"""`zerotunnel node`: run the node proxy (our ztunnel) for one node."""

from __future__ import annotations

from pathlib import Path

import click

from zerotunnel.errors import InputError


@click.command("node")
@click.option("--node", "node_name", required=True, help="Name of the node this proxy serves.")
@click.option(
    "-f",
    "--filename",
    "paths",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Configuration files or directories (Istio and Kubernetes YAML); watched for changes.",
)
@click.option(
    "--ca-dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Mesh CA directory (Istio cacerts layout) that signs this node's workload certificates.",
)
@click.option(
    "--addresses",
    type=click.Path(path_type=Path),
    help='JSON {"pod_ips": {"ns/name": ip}, "service_vips": {"ns/name": vip}}; watched.',
)
@click.option(
    "--pod-api",
    type=click.Path(path_type=Path),
    help="Unix socket on which pods are added/removed (default /run/zerotunnel/node-NAME.sock).",
)
@click.option(
    "--admin",
    "admin_addr",
    default="127.0.0.1:15000",
    show_default=True,
    help="Admin endpoint (config dump, certificates, connections); loopback only.",
)
@click.option(
    "--metrics", "metrics_addr", default="0.0.0.0:15020", show_default=True, help="Prometheus metrics."
)
@click.option(
    "--readiness",
    "ready_addr",
    default="0.0.0.0:15021",
    show_default=True,
    help="Readiness probe (/healthz/ready).",
)
@click.option(
    "--pod",
    "pods",
    multiple=True,
    metavar="UID=NETNS=IP",
    help="Serve this pod from the start (e.g. namespace-a/app-a=/run/netns/x=10.244.1.2).",
)
@click.option("--drain", default=5.0, show_default=True, help="Seconds live connections get on SIGTERM.")
def node(
    node_name: str,
    paths: tuple[Path, ...],
    ca_dir: Path,
    addresses: Path | None,
    pod_api: Path | None,
    admin_addr: str,
    metrics_addr: str,
    ready_addr: str,
    pods: tuple[str, ...],
    drain: float,
) -> None:
    """Run the node proxy: transparent capture, HBONE over mutual TLS, L4 authorization.

    For every pod added (through --pod-api or --pod) it opens 15001 (outbound), 15006 (plaintext
    inbound) and 15008 (HBONE) inside the pod's network namespace, with the pod's own SPIFFE
    certificate. Access-log lines (JSON, one per connection) go to stdout; the log to stderr.
    """
    from zerotunnel.node import admin
    from zerotunnel.node.main import NodeOptions, run

    admin_listen = admin.parse_listen(admin_addr, what="--admin")
    admin.require_loopback(admin_listen[0], what="--admin")
    parsed_pods = []
    for spec in pods:
        parts = spec.split("=")
        if len(parts) != 3 or not all(parts):
            raise InputError(f"--pod: expected UID=NETNS=IP, got {spec!r}")
        parsed_pods.append((parts[0], parts[1], parts[2]))
    run(
        NodeOptions(
            node=node_name,
            config_paths=paths,
            ca_dir=ca_dir,
            addresses=addresses,
            pod_api=pod_api or Path(f"/run/zerotunnel/node-{node_name}.sock"),
            admin=admin_listen,
            metrics=admin.parse_listen(metrics_addr, what="--metrics"),
            readiness=admin.parse_listen(ready_addr, what="--readiness"),
            drain_seconds=drain,
            pods=tuple(parsed_pods),
        )
    )
