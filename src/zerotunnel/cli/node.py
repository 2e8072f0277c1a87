"""`zerotunnel node`: run the node proxy (our ztunnel) for one node."""

from __future__ import annotations

from pathlib import Path

import click

from zerotunnel.errors import InputError


@click.command("node")
@click.option("--node", "node_name", required=True, help="Name of the node this proxy serves.")
@click.option(
    "--control",
    metavar="HOST:PORT",
    help="Control plane CA/xDS address (e.g. 127.0.0.1:15012): certificates and config come from it.",
)
@click.option("--join-token", help="One-time token (`zerotunnel control token create`) for the first start.")
@click.option(
    "--ca-root",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="The control plane's root certificate, to authenticate it when enrolling.",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    help="Where the node identity is kept (default /var/lib/zerotunnel/node-NAME).",
)
@click.option(
    "-f",
    "--filename",
    "paths",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Standalone mode: configuration files or directories (Istio and Kubernetes YAML); watched.",
)
@click.option(
    "--ca-dir",
    type=click.Path(path_type=Path),
    help="Standalone mode: mesh CA directory (Istio cacerts layout) that signs workload certificates.",
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
@click.option(
    "--max-setting-up",
    default=512,
    show_default=True,
    type=click.IntRange(min=1),
    help="Outbound connections being set up (accepted, tunnel not yet open) across the node's pods; "
    "beyond it new ones are reset at once, so overload does not slow the admitted ones down.",
)
def node(
    node_name: str,
    control: str | None,
    join_token: str | None,
    ca_root: Path | None,
    state_dir: Path | None,
    paths: tuple[Path, ...],
    ca_dir: Path | None,
    addresses: Path | None,
    pod_api: Path | None,
    admin_addr: str,
    metrics_addr: str,
    ready_addr: str,
    pods: tuple[str, ...],
    drain: float,
    max_setting_up: int,
) -> None:
    """Run the node proxy: transparent capture, HBONE over mutual TLS, L4 authorization.

    For every pod added (through --pod-api or --pod) it opens 15001 (outbound), 15006 (plaintext
    inbound) and 15008 (HBONE) inside the pod's network namespace, with the pod's own SPIFFE
    certificate. Access-log lines (JSON, one per connection) go to stdout; the log to stderr.

    With --control the node holds no CA key: it enrols with --join-token (once; the identity is kept in
    --state-dir) and receives certificates and configuration from the control plane. Without it, it
    runs standalone from -f files and a local --ca-dir.
    """
    if control is None and (ca_dir is None or not paths):
        raise InputError("give --control HOST:PORT, or -f PATH and --ca-dir DIR for standalone mode")
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
            control=control,
            join_token=join_token,
            ca_root=ca_root,
            state_dir=state_dir,
            addresses=addresses,
            pod_api=pod_api or Path(f"/run/zerotunnel/node-{node_name}.sock"),
            admin=admin_listen,
            metrics=admin.parse_listen(metrics_addr, what="--metrics"),
            readiness=admin.parse_listen(ready_addr, what="--readiness"),
            drain_seconds=drain,
            max_setting_up=max_setting_up,
            pods=tuple(parsed_pods),
        )
    )
