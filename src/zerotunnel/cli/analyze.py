"""`zerotunnel analyze`: lint a configuration and explain each finding with its fix (issue 3).

The checks are pure (`zerotunnel.policy.analyze`); this shell loads the files and prints. Exit status 1
when any finding is an error, 2 when the configuration does not load.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import click
from rich.console import Console
from rich.table import Table

from zerotunnel.config import load
from zerotunnel.control.files import read_config_paths
from zerotunnel.errors import InputError
from zerotunnel.policy.analyze import Finding
from zerotunnel.policy.analyze import analyze as run_analysis

_STYLE = {"error": "red", "warning": "yellow", "info": "cyan"}


def render_text(findings: list[Finding], console: Console) -> None:
    if not findings:
        console.print("no findings")
        return
    table = Table(title=f"{len(findings)} finding(s)", show_lines=True)
    for col in ("code", "severity", "resource", "message", "fix"):
        table.add_column(col, overflow="fold")
    for f in findings:
        style = _STYLE.get(f.severity, "")
        table.add_row(f.code, f"[{style}]{f.severity}[/{style}]", f.resource, f.message, f.fix)
    console.print(table)


@click.command("analyze")
@click.option("-f", "--file", "files", multiple=True, required=True, help="configuration file or directory")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
def analyze(files: tuple[str, ...], output: str) -> None:
    """Find mistakes in AuthorizationPolicy / PeerAuthentication / RequestAuthentication / waypoints."""
    try:
        config = load(read_config_paths(list(files)))
    except InputError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(2)
    findings = run_analysis(config)
    if output == "json":
        click.echo(json.dumps({"findings": [asdict(f) for f in findings]}, indent=2))
    else:
        render_text(findings, Console(soft_wrap=False, width=160))
    sys.exit(1 if any(f.severity == "error" for f in findings) else 0)
