"""`zerotunnel authz check`: would this request be allowed, and why? (issue 3, istio#4856)

A thin shell over `zerotunnel.policy.explain`: it reads the files, the clock and any JWKS file a
RequestAuthentication names, and prints the hops. Exit status: 0 allowed, 1 denied, 2 bad input —
set with `sys.exit`, because the entry point runs click with `standalone_mode=False`, which turns a
`ctx.exit(code)` into a return value that is then dropped.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from zerotunnel.config import Config, load
from zerotunnel.control.files import read_config_paths
from zerotunnel.errors import InputError
from zerotunnel.policy.explain import CheckQuery, Explanation, explain


def load_config(files: tuple[str, ...]) -> Config:
    return load(read_config_paths(list(files)))


def jwks_texts(config: Config, warnings: list[str]) -> dict[str, str]:
    """JWKS for `jwksUri` values that are local files (`file://` or a path); remote URIs are not
    fetched by this offline tool, which says so."""
    out: dict[str, str] = {}
    for ra in config.request_authentications:
        for rule in ra.jwt_rules:
            uri = rule.jwks_uri
            if not uri or rule.jwks is not None:
                continue
            path = Path(uri.removeprefix("file://"))
            if uri.startswith(("http://", "https://")):
                warnings.append(
                    f"jwksUri {uri} is not fetched by authz check; tokens of {rule.issuer} fail as 401"
                )
            elif path.is_file():
                out[uri] = path.read_text(encoding="utf-8")
            else:
                warnings.append(f"jwksUri {uri}: file not found")
    return out


def _headers(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    out = []
    for v in values:
        name, sep, value = v.partition("=")
        if not sep or not name:
            raise InputError(f"--header must be NAME=VALUE, got {v!r}")
        out.append((name, value))
    return tuple(out)


def render_text(result: Explanation, console: Console) -> None:
    table = Table(title="authorization check", show_lines=False)
    for col in ("hop", "source", "destination", "decision", "status", "policy", "reason"):
        table.add_column(col, overflow="fold")
    for hop in result.hops:
        d = hop.decision
        table.add_row(
            f"{hop.kind} {hop.name}",
            hop.source,
            hop.destination,
            "[green]ALLOW[/green]" if d.allowed else "[red]DENY[/red]",
            str(d.status),
            d.policy or "-",
            d.reason,
        )
    console.print(table)
    verdict = "[green]ALLOW[/green]" if result.allowed else "[red]DENY[/red]"
    console.print(
        f"decision: {verdict}  enforced by: {result.enforced_by or '-'}  status: {result.status}  "
        f"policy: {result.policy or '-'}"
    )
    console.print(f"reason: {result.reason}", markup=False)
    for hit in result.dry_run:
        console.print(f"dry-run: {hit}", markup=False)
    for warning in result.warnings:
        console.print(f"warning: {warning}", markup=False)


@click.group("authz")
def authz() -> None:
    """Explain authorization decisions offline, from the same YAML the mesh runs."""


@authz.command("check")
@click.option("-f", "--file", "files", multiple=True, required=True, help="configuration file or directory")
@click.option("--to", "to", required=True, metavar="NAMESPACE/POD", help="destination pod")
@click.option("--to-ip", help="destination IP (default: the pod's IP)")
@click.option("--port", type=click.IntRange(1, 65535), help="destination (pod target) port")
@click.option("--from", "from_pod", metavar="NAMESPACE/POD", help="client pod")
@click.option("--from-principal", metavar="TD/ns/NS/sa/SA", help="client identity")
@click.option("--from-plaintext", is_flag=True, help="client without identity (outside the mesh)")
@click.option("--from-ip", help="client IP")
@click.option("--via", type=click.Choice(["auto", "ztunnel", "waypoint"]), default="auto", show_default=True)
@click.option("--method", default="GET", show_default=True)
@click.option("--path", default="/", show_default=True)
@click.option("--host", help="Host header (default: the service hostname)")
@click.option("--header", "headers", multiple=True, metavar="NAME=VALUE")
@click.option("--jwt", help="bearer token sent as Authorization")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
def check(
    files: tuple[str, ...],
    to: str,
    to_ip: str | None,
    port: int | None,
    from_pod: str | None,
    from_principal: str | None,
    from_plaintext: bool,
    from_ip: str | None,
    via: str,
    method: str,
    path: str,
    host: str | None,
    headers: tuple[str, ...],
    jwt: str | None,
    output: str,
) -> None:
    """Would a request from a client to a pod be allowed, and why?"""
    try:
        config = load_config(files)
        shell_warnings: list[str] = []
        jwks = jwks_texts(config, shell_warnings)
        query = CheckQuery(
            to=to,
            port=port,
            to_ip=to_ip,
            from_pod=from_pod,
            from_principal=from_principal,
            from_plaintext=from_plaintext,
            from_ip=from_ip,
            via=via,
            method=method,
            path=path,
            host=host,
            headers=_headers(headers),
            jwt=jwt,
        )
        result = explain(config, query, now=datetime.now(UTC), jwks_by_uri=jwks)
    except InputError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(2)
    if shell_warnings:
        result = Explanation(
            result.allowed,
            result.enforced_by,
            result.policy,
            result.reason,
            result.status,
            result.hops,
            result.dry_run,
            (*result.warnings, *shell_warnings),
        )
    if output == "json":
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        render_text(result, Console(soft_wrap=False, width=160))
    sys.exit(0 if result.allowed else 1)
