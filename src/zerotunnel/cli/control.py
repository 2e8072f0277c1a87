"""`zerotunnel control`: run the control plane (our istiod), mint join tokens, show its status (issue 6).

    zerotunnel control --config DIR [--state-dir DIR] [--ca-dir DIR] [--listen ADDR]   # = `control serve`
    zerotunnel control token create --node NAME [--ttl 1h] [--state-dir DIR]
    zerotunnel control status [--state-dir DIR] [--json]

Without a subcommand `control` serves, so `zerotunnel control --config DIR` starts the control plane.
The state directory (default /var/lib/zerotunnel/control, or $ZEROTUNNEL_CONTROL_STATE) holds the
self-signed CA (`ca/`, key 0600) unless `--ca-dir` names a plug-in `cacerts` directory, the hashes of the
join tokens, and `status.json`. Nodes enrol with the CA's root (`<state-dir>/ca/root-cert.pem`) given to
them out of band: `zerotunnel node --control ADDR --join-token TOKEN --ca-root FILE`.

Exit status: 0 success, 2 bad input (one line on stderr, printed by `zerotunnel.cli.main`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from zerotunnel.cli.ca import parse_duration
from zerotunnel.control.server import DEFAULT_LISTEN, STATUS_FILE, ControlPlane, fingerprint
from zerotunnel.control.tokens import DEFAULT_TOKEN_TTL, TokenStore
from zerotunnel.errors import InputError

DEFAULT_STATE_DIR = "/var/lib/zerotunnel/control"
_STATE_ENV = "ZEROTUNNEL_CONTROL_STATE"


def _state_option(f: Any) -> Any:
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False),
        default=DEFAULT_STATE_DIR,
        envvar=_STATE_ENV,
        show_default=True,
        help=f"Control plane state directory (CA, join-token hashes, status.json); env {_STATE_ENV}.",
    )(f)


def _serve_options(f: Any) -> Any:
    options: list[Callable[[Any], Any]] = [
        click.option("--config", "-c", "config", multiple=True, type=click.Path(exists=True),
                     help="Configuration file or directory (repeatable); watched for changes."),
        _state_option,
        click.option("--ca-dir", type=click.Path(file_okay=False), default=None,
                     help="Plug-in CA in Istio's cacerts layout (default: self-signed CA in the state dir)."),
        click.option("--listen", default=DEFAULT_LISTEN, show_default=True,
                     help="CA address (mTLS, node SVIDs)."),
        click.option("--enrol-listen", default=None,
                     help="Enrolment address (server-only TLS, join tokens) [default: CA port + 1]."),
        click.option("--metrics-listen", default="127.0.0.1:15014", show_default=True,
                     help="Prometheus metrics (loopback only); 'off' disables."),
        click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
                     default="info", show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.group(invoke_without_command=True)
@_serve_options
@click.pass_context
def control(ctx: click.Context, /, **kw: Any) -> None:
    """The control plane: mesh CA over gRPC/mTLS, node enrolment with join tokens."""
    if ctx.invoked_subcommand is None:
        _serve(**kw)


@control.command("serve")
@_serve_options
def serve(**kw: Any) -> None:
    """Run the control plane until SIGINT/SIGTERM."""
    _serve(**kw)


def _serve(
    *, config: tuple[str, ...], state_dir: str, ca_dir: str | None, listen: str, enrol_listen: str | None,
    metrics_listen: str, log_level: str,
) -> None:
    if not config:
        raise InputError("--config DIR is required to serve (the pods, their nodes and the mesh config)")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plane = ControlPlane(
        Path(state_dir), [Path(c) for c in config], ca_dir=Path(ca_dir) if ca_dir else None,
        listen=listen, enrol_listen=enrol_listen,
        metrics_listen=None if metrics_listen == "off" else metrics_listen,
    )

    async def run() -> None:
        await plane.start()
        click.echo(
            f"control plane: CA on {listen} (port {plane.ca_port}), enrolment on port {plane.enrol_port}; "
            f"root {plane.ca_source / 'root-cert.pem'} sha256 {fingerprint(plane.ca.root_bundle_pem)}",
            err=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await plane.stop(grace=2.0)

    asyncio.run(run())


@control.group("token")
def token() -> None:
    """Join tokens for node enrolment (single use, expiring)."""


@token.command("create")
@click.option("--node", required=True, help="Node name the token enrols (becomes its SPIFFE ID).")
@click.option("--ttl", default=None, help=f"Token lifetime, e.g. 30m, 1h (default {DEFAULT_TOKEN_TTL}).")
@_state_option
def token_create(node: str, ttl: str | None, state_dir: str) -> None:
    """Mint a join token and print it once; only its hash is stored."""
    lifetime = parse_duration(ttl) if ttl else DEFAULT_TOKEN_TTL
    tok, record = TokenStore(Path(state_dir)).create(node, datetime.now(UTC), lifetime)
    click.echo(tok)
    click.echo(
        f"join token for node {record.node}, single use, expires {record.expires.isoformat()}", err=True
    )


@control.command("status")
@_state_option
@click.option("--json", "as_json", is_flag=True, help="Print status.json as written by the control plane.")
def status(state_dir: str, as_json: bool) -> None:
    """Nodes enrolled, certificates issued/refused, config errors (from the state directory)."""
    path = Path(state_dir) / STATUS_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no control plane status (never run with this --state-dir?)") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable ({exc})") from None
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    certs, enrol, cfg = data["certificates"], data["enrolment"], data["config"]
    refused = ", ".join(f"{k} {v}" for k, v in sorted(certs["refused"].items())) or "none"
    lines = [
        f"status as of   {data['updated']}",
        f"trust domain   {data['trust_domain']}",
        f"CA             {data['ca']['source']} ({data['ca'].get('roots', 1)} root(s), first root sha256 "
        f"{data['ca']['root_sha256']}, until {data['ca']['not_after']})"
        + (f", ERROR: {data['ca']['error']}" if data["ca"].get("error") else ""),
        f"listening      CA {data['listen']['ca']}, enrolment {data['listen']['enrolment']}",
        f"config         version {cfg['version']}" + (f", ERROR: {cfg['error']}" if cfg["error"] else ", ok"),
        f"certificates   issued {certs['issued']}, refused: {refused}",
        f"enrolment      accepted {enrol['accepted']}, refused: "
        + (", ".join(f"{k} {v}" for k, v in sorted(enrol["refused"].items())) or "none")
        + f", unused tokens {enrol['tokens_pending']}",
        f"snapshot       version {data.get('snapshot', {}).get('version', '-')}, "
        f"{data.get('snapshot', {}).get('documents', 0)} documents",
        f"nodes          {len(data['nodes'])}",
    ]
    per_node = certs.get("issued_per_node", {})
    for n in data["nodes"]:
        issued = per_node.get(n["name"], 0)
        line = f"  {n['name']:<24} last seen {n['last_seen'] or '-'}, certificates {issued}"
        if "streams" in n:
            line += (f", config stream {'up' if n['streams'] else 'down'}, sent {n['sent']}, "
                     f"acked {n['acked']}")
            if n.get("nacked") is not None:
                line += f", NACKED {n['nacked']}: {n['nack_error']}"
        lines.append(line)
    click.echo("\n".join(lines))
