"""Flags the proxy commands share: admin endpoints and listener limits (waypoint, gateway).

One definition so the defaults and `--help` texts cannot drift apart between the commands; the
listener-limit defaults are the node proxy's 15008 caps (security.md §3 "connection limits").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

F = TypeVar("F", bound=Callable[..., object])

HANDSHAKE_TIMEOUT = 10.0
MAX_CONNECTIONS = 4096
MAX_PENDING_HANDSHAKES = 256


def admin_endpoints(func: F) -> F:
    """`--metrics` (15020) and `--readiness` (15021), each disabled with 'off'."""
    func = click.option(
        "--readiness",
        "ready_addr",
        default="0.0.0.0:15021",
        show_default=True,
        help="Readiness probe (/healthz/ready); 'off' disables.",
    )(func)
    return click.option(
        "--metrics",
        "metrics_addr",
        default="0.0.0.0:15020",
        show_default=True,
        help="Prometheus metrics; 'off' disables.",
    )(func)


def listen_or_off(value: str, flag: str) -> tuple[str, int] | None:
    """An admin endpoint flag's value: None for 'off', else a parsed address (bad input: exit 2)."""
    from zerotunnel.node import admin

    return None if value == "off" else admin.parse_listen(value, what=flag)


def listener_limits(max_connections_help: str) -> Callable[[F], F]:
    """`--handshake-timeout`, `--max-connections`, `--max-pending-handshakes` (security.md §4 items
    15-16). What happens at the connection cap differs per listener, so its help is the caller's."""

    def apply(func: F) -> F:
        func = click.option(
            "--max-pending-handshakes",
            default=MAX_PENDING_HANDSHAKES,
            show_default=True,
            type=click.IntRange(min=1),
            help="Sockets per listener still in their TLS handshake (unauthenticated); at the cap the "
            "oldest one that has sent nothing (else the oldest) is dropped for the newcomer.",
        )(func)
        func = click.option(
            "--max-connections",
            default=MAX_CONNECTIONS,
            show_default=True,
            type=click.IntRange(min=1),
            help=max_connections_help,
        )(func)
        return click.option(
            "--handshake-timeout",
            default=HANDSHAKE_TIMEOUT,
            show_default=True,
            type=click.FloatRange(min=0.1),
            help="Seconds a client has to complete its TLS handshake (the whole handshake, not idle time).",
        )(func)

    return apply
