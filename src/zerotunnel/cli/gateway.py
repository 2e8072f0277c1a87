"""`zerotunnel gateway`: run the ingress gateway (Istio Gateway + VirtualService + Secret)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("gateway")
@click.option(
    "-f",
    "--filename",
    "paths",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Configuration files or directories (Istio and Kubernetes YAML, Secrets); watched.",
)
@click.option(
    "--ca-dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Mesh CA directory (Istio cacerts layout) that signs the gateway's mesh certificate.",
)
@click.option(
    "--addresses",
    type=click.Path(path_type=Path),
    help='JSON {"pod_ips": {"ns/name": ip}, "service_vips": {"ns/name": vip}}; watched.',
)
@click.option("--gateway", metavar="NS/NAME", help="Serve only this Istio Gateway (default: all of them).")
@click.option(
    "--listen-host",
    default="0.0.0.0",  # noqa: S104 - the ingress gateway serves outside clients
    show_default=True,
    help="Address the Gateway's server ports listen on.",
)
@click.option(
    "--metrics",
    "metrics_addr",
    default="0.0.0.0:15020",
    show_default=True,
    help="Prometheus metrics; 'off' disables.",
)
@click.option(
    "--readiness",
    "ready_addr",
    default="0.0.0.0:15021",
    show_default=True,
    help="Readiness probe (/healthz/ready); 'off' disables.",
)
@click.option(
    "--handshake-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds a client has to complete its TLS handshake (the whole handshake, not idle time).",
)
@click.option(
    "--max-connections",
    default=4096,
    show_default=True,
    type=click.IntRange(min=1),
    help="Open connections per listener; beyond it the oldest pending handshake is dropped, or, "
    "when none is pending, the new socket is reset.",
)
@click.option(
    "--max-pending-handshakes",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Sockets per listener still in their TLS handshake (unauthenticated); at the cap the "
    "oldest pending one is dropped.",
)
def gateway(
    paths: tuple[Path, ...],
    ca_dir: Path,
    addresses: Path | None,
    gateway: str | None,
    listen_host: str,
    metrics_addr: str,
    ready_addr: str,
    handshake_timeout: float,
    max_connections: int,
    max_pending_handshakes: int,
) -> None:
    """Run the ingress gateway: TLS/mTLS from outside clients (several external CAs, CRL, SAN
    allow-list), routing by host and path into the mesh over HBONE with XFCC.

    One JSON access-log line per request (and per refused handshake) goes to stdout.
    """
    from zerotunnel.gateway.main import GatewayOptions, parse_gateway, run
    from zerotunnel.node import admin

    run(
        GatewayOptions(
            config_paths=paths,
            ca_dir=ca_dir,
            gateway=parse_gateway(gateway),
            addresses=addresses,
            listen_host=listen_host,
            metrics=None if metrics_addr == "off" else admin.parse_listen(metrics_addr, what="--metrics"),
            readiness=None if ready_addr == "off" else admin.parse_listen(ready_addr, what="--readiness"),
            handshake_timeout=handshake_timeout,
            max_connections=max_connections,
            max_pending_handshakes=max_pending_handshakes,
        )
    )
