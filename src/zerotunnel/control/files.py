"""Read configuration files for the pure loader (`zerotunnel.config.load`).

The loader takes (file name, text) pairs so it stays free of I/O (DESIGN.md §5); this shell turns the
paths a user gives (`-f PATH`, `zerotunnel up DIR`) into those pairs the way `kubectl apply -f DIR -R`
would: files and directories, recursively, only `*.yaml`/`*.yml`/`*.json`, in a stable sorted order
so that load order (the "oldest" tie-break) does not depend on the file system.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from zerotunnel.errors import InputError

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def _files_under(directory: Path) -> list[Path]:
    found = [
        p
        for p in directory.rglob("*")
        if p.suffix.lower() in CONFIG_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    ]
    return sorted(found, key=lambda p: p.relative_to(directory).parts)


def read_config_paths(paths: Sequence[Path | str]) -> list[tuple[str, str]]:
    """(file name, UTF-8 text) for every configuration file named or found under `paths`, in order.

    A path given explicitly is read whatever its suffix (the user asked for it); inside directories
    only configuration suffixes are read and hidden files/directories (`.git`, editor swap files) are
    skipped. Raises `InputError` for a missing path, an unreadable file or text that is not UTF-8.
    """
    out: list[tuple[str, str]] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files = _files_under(path)
        elif path.exists():
            files = [path]
        else:
            raise InputError(f"configuration path not found: {path}")
        for file in files:
            resolved = file.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            try:
                text = file.read_bytes().decode("utf-8-sig")
            except OSError as exc:
                raise InputError(f"cannot read configuration file {file}: {exc.strerror or exc}") from exc
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"configuration file {file} is not UTF-8 text (byte {exc.start}: {exc.reason})"
                ) from exc
            out.append((str(file), text))
    return out
