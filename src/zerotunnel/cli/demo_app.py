"""`zerotunnel demo-app`: the echo server users run as a pod command (issue 5, "A demo app").

Stdout carries one line per request (`METHOD TARGET STATUS PEER`), flushed at once, so `zerotunnel logs POD`
shows traffic as it happens; the start-up line ("listening on ...", with the real port when --port 0)
and errors go to stderr. SIGTERM or SIGINT stop it cleanly with exit status 0.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Coroutine
from typing import Any

import click

from zerotunnel.demoapp import DemoAppError, run_demo_app, stdout_logger
from zerotunnel.errors import InputError


def _default_name() -> str:
    """Like a Kubernetes pod, whose HOSTNAME is the pod name; the host name otherwise."""
    return os.environ.get("HOSTNAME") or socket.gethostname()


def _announce(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@click.command("demo-app")
@click.option(
    "--port",
    "-p",
    type=click.IntRange(0, 65535),
    required=True,
    help="TCP port to listen on (0 picks a free one and prints it).",
)
@click.option(
    "--host",
    default="0.0.0.0",  # noqa: S104 - a pod's app must answer on its pod IP, whatever it is
    show_default=True,
    help="Address to listen on.",
)
@click.option("--name", default=None, help="Name reported in every response [default: $HOSTNAME].")
@click.option("--quiet", "-q", is_flag=True, help="Do not print a line per request (benchmarks).")
def demo_app(port: int, host: str, name: str | None, quiet: bool) -> None:
    """HTTP/1.1 + HTTP/2 (h2c) echo server answering JSON about each request.

    The JSON has name, method, path, query, headers, peer, local, http_version and body_bytes, so you can
    see what the mesh delivered. GET /healthz answers `ok`; /status/CODE answers with that status.
    """
    log = None if quiet else stdout_logger(sys.stdout)
    coroutine = run_demo_app(host, port, name or _default_name(), log=log, announce=_announce)
    try:
        _run(coroutine)
    except DemoAppError as exc:
        raise InputError(exc.message) from exc


def _run(coroutine: Coroutine[Any, Any, None]) -> None:
    """With uvloop when it is installed (DESIGN.md §5, hot paths), plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coroutine)
