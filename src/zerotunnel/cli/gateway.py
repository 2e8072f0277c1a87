"""`zerotunnel gateway`: run the ingress gateway (Istio Gateway + VirtualService + Secret)."""

from __future__ import annotations

from pathlib import Path

import click

from zerotunnel.cli.options import admin_endpoints, listen_or_off, listener_limits


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
@admin_endpoints
@listener_limits(
    "Open connections per listener; beyond it the oldest pending handshake is dropped, or, "
    "when none is pending, the new socket is reset."
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

    run(
        GatewayOptions(
            config_paths=paths,
            ca_dir=ca_dir,
            gateway=parse_gateway(gateway),
            addresses=addresses,
            listen_host=listen_host,
            metrics=listen_or_off(metrics_addr, "--metrics"),
            readiness=listen_or_off(ready_addr, "--readiness"),
            handshake_timeout=handshake_timeout,
            max_connections=max_connections,
            max_pending_handshakes=max_pending_handshakes,
        )
    )
