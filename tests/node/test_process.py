from __future__ import annotations

import asyncio
import os
import signal

import pytest

from zerotunnel.errors import InputError
from zerotunnel.node.process import cancel_all, parse_namespaced_name, stop_on_signals


def test_parse_namespaced_name() -> None:
    assert parse_namespaced_name("ns/name", flag="--gateway") == ("ns", "name")
    for bad in ("name", "/name", "ns/", "a/b/c"):
        with pytest.raises(InputError, match="--gateway: expected NAMESPACE/NAME"):
            parse_namespaced_name(bad, flag="--gateway")


async def test_sigterm_sets_stop_and_tasks_are_cancelled() -> None:
    stop = asyncio.Event()
    stop_on_signals(stop)
    try:
        forever = asyncio.create_task(asyncio.sleep(3600))
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 5)
        await cancel_all([forever])
        assert forever.cancelled()
    finally:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
