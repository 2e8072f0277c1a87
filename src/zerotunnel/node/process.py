"""What every long-running zerotunnel process does the same way: node proxy, waypoint, gateway.

Logging to stderr in one format, SIGTERM/SIGINT as the stop signal (then a drain), background tasks
cancelled on the way out, a rejected configuration reported without replacing the last good one, and
uvloop when installed and wanted (DESIGN.md §5: optional speed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import sys
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from zerotunnel.errors import InputError

log = logging.getLogger("zerotunnel.config")


def stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    pending = list(tasks)
    for task in pending:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*pending, return_exceptions=True)


def config_rejected(error: InputError) -> None:
    """`FileConfigSource.watch`'s on_error for processes: the last good configuration stays in force."""
    log.error("configuration change rejected; the last good configuration stays in force: %s", error)


def parse_namespaced_name(value: str, *, flag: str) -> tuple[str, str]:
    """`NAMESPACE/NAME` from a command-line flag, or a one-line InputError naming the flag."""
    ns, sep, name = value.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise InputError(f"{flag}: expected NAMESPACE/NAME, got {value!r}")
    return ns, name


def raise_open_files_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the limit now in force.

    Every proxied connection holds a descriptor in the node proxy on each side it serves (the pod's
    captured socket, the socket to the app), so the usual soft limit of 1,024 caps a node at well under
    a thousand connections. ztunnel raises its soft limit to the hard one at start-up
    (`increase_open_files_limit`), as nginx and haproxy do; so does the node proxy (issue 9: 10,000
    concurrent tunnels). The waypoint and the gateway hold a socket per connection as well, so every
    process started through `run_process` does it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("open-files limit stays at %d (hard %d): %s", soft, hard, exc)
            return soft
    return hard


def run_process(main: Callable[[], Coroutine[Any, Any, None]], *, use_uvloop: bool = True) -> None:
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    raise_open_files_limit()
    if use_uvloop:
        try:
            import uvloop
        except ImportError:  # uvloop is optional (DESIGN.md §5)
            pass
        else:
            uvloop.run(main())
            return
    asyncio.run(main())
