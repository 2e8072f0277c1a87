"""`zerotunnel waypoint`: run one waypoint (the L7 proxy of a Gateway of class istio-waypoint)."""

from __future__ import annotations

from pathlib import Path

import click

from zerotunnel.cli.options import admin_endpoints, listen_or_off, listener_limits


@click.command("waypoint")
@click.option(
    "--gateway",
    required=True,
    metavar="NS/NAME",
    help="The Gateway (gatewayClassName: istio-waypoint) this process runs.",
)
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
    help="Mesh CA directory (Istio cacerts layout) that signs the waypoint's certificate.",
)
@click.option(
    "--addresses",
    type=click.Path(path_type=Path),
    help='JSON {"pod_ips": {"ns/name": ip}, "service_vips": {"ns/name": vip}}; watched.',
)
@click.option("--listen", default="0.0.0.0:15008", show_default=True, help="HBONE listener.")
@click.option("--drain", default=5.0, show_default=True, help="Seconds live tunnels get on SIGTERM.")
@admin_endpoints
@listener_limits("Open connections per listener; beyond it new sockets are reset at accept.")
def waypoint(
    gateway: str,
    paths: tuple[Path, ...],
    ca_dir: Path,
    addresses: Path | None,
    listen: str,
    metrics_addr: str,
    ready_addr: str,
    drain: float,
    handshake_timeout: float,
    max_connections: int,
    max_pending_handshakes: int,
) -> None:
    """Run a waypoint: terminate HBONE, parse HTTP/1.1 and HTTP/2, enforce L7 AuthorizationPolicy and
    RequestAuthentication, forward over HBONE with the waypoint's own identity.

    One JSON access-log line per request goes to stdout; the log to stderr.
    """
    from zerotunnel.node import admin
    from zerotunnel.waypoint.main import WaypointOptions, parse_gateway, run

    run(
        WaypointOptions(
            gateway=parse_gateway(gateway),
            config_paths=paths,
            ca_dir=ca_dir,
            addresses=addresses,
            listen=admin.parse_listen(listen, what="--listen"),
            metrics=listen_or_off(metrics_addr, "--metrics"),
            readiness=listen_or_off(ready_addr, "--readiness"),
            drain_seconds=drain,
            handshake_timeout=handshake_timeout,
            max_connections=max_connections,
            max_pending_handshakes=max_pending_handshakes,
        )
    )
