"""A configuration source that follows files on disk: the last good config always stays in force.

DESIGN.md §2: "a bad change never replaces the last good config: the old one stays in force and the
error is reported". The node proxy in standalone mode, the local cluster and the control plane all read
configuration through this, so they all behave that way. A change is applied only when the whole set of
files loads (never a partial apply, issue 9), and an edit that leaves the text unchanged is not a new
version.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import watchfiles

from zerotunnel.config import Config, ConfigError, load
from zerotunnel.control.files import read_config_paths
from zerotunnel.errors import InputError

log = logging.getLogger("zerotunnel.config")
SETTLE_SECONDS = 0.3
SETTLE_ROUNDS = 8

OnConfig = Callable[[Config, int], Awaitable[None] | None]
OnError = Callable[[InputError], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    config: Config
    version: int
    digest: str


def _digest(files: Sequence[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, text in files:
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


class FileConfigSource:
    """Loads `paths` (files and directories, as `kubectl apply -f`) and reloads them on change."""

    def __init__(self, paths: Sequence[Path | str], extra: Sequence[tuple[str, str]] = ()) -> None:
        self.paths = [Path(p) for p in paths]
        self._extra = list(extra)
        self.current: LoadedConfig | None = None
        self.last_error: InputError | None = None

    def load(self) -> LoadedConfig:
        """Read and load everything now; on failure raise and keep the previous config."""
        files = read_config_paths(self.paths) + self._extra
        digest = _digest(files)
        if self.current is not None and digest == self.current.digest:
            return self.current
        config = load(files)
        version = 1 if self.current is None else self.current.version + 1
        self.current = LoadedConfig(config, version, digest)
        self.last_error = None
        return self.current

    async def _settled(self) -> None:
        """Wait until two reads `SETTLE_SECONDS` apart see the same files (at most `SETTLE_ROUNDS`).

        An editor that saves by unlinking and re-creating a file, or a writer that truncates and then
        writes, shows the watcher an intermediate state that is valid YAML: the file missing, or empty
        (zero documents). Loading that would apply the config *without* the file's policies for a moment
        — a DENY lifted — which is a partial apply (issue 9: found by tests/faults, an editor-style save
        let a denied client through). A change is loaded only once the files stopped moving.
        """
        last: str | None = None
        for _ in range(SETTLE_ROUNDS):
            try:
                digest = _digest(read_config_paths(self.paths))
            except InputError:
                digest = None
            if digest is not None and digest == last:
                return
            last = digest
            await asyncio.sleep(SETTLE_SECONDS)

    async def watch(self, on_config: OnConfig, on_error: OnError, stop: asyncio.Event | None = None) -> None:
        """Call `on_config(config, version)` for every good change, `on_error(err)` for a bad one."""
        async for _changes in watchfiles.awatch(*self.paths, debounce=200, step=50, stop_event=stop):
            await self._settled()
            previous = self.current
            try:
                loaded = self.load()
            except (ConfigError, InputError) as exc:
                self.last_error = exc
                log.error("configuration rejected, keeping version %s: %s",
                          previous.version if previous else "none", exc)
                result = on_error(exc)
                if result is not None:
                    await result
                continue
            if previous is not None and loaded.version == previous.version:
                continue
            log.info("configuration version %d loaded", loaded.version)
            result = on_config(loaded.config, loaded.version)
            if result is not None:
                await result
