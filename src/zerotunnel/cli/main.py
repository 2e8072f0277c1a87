"""The `zerotunnel` command: a click group whose subcommands live in their own modules.

Subcommands are imported only when invoked, so `zerotunnel ca inspect` does not pay for grpc or
asyncio start-up, and a module missing from a partial install does not break the others.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from zerotunnel import __version__
from zerotunnel.errors import InputError

# command name -> (module under zerotunnel.cli, attribute holding the click command)
_COMMANDS: dict[str, tuple[str, str]] = {
    "ca": ("ca", "ca"),
    "authz": ("authz", "authz"),
    "analyze": ("analyze", "analyze"),
    "node": ("node", "node"),
    "control": ("control", "control"),
    "waypoint": ("waypoint", "waypoint"),
    "gateway": ("gateway", "gateway"),
    "up": ("cluster", "up"),
    "down": ("cluster", "down"),
    "status": ("cluster", "status"),
    "exec": ("cluster", "exec_"),
    "logs": ("cluster", "logs"),
    "traffic": ("cluster", "traffic"),
    "demo-app": ("demo_app", "demo_app"),
}


def _module_present(module: str) -> bool:
    return importlib.util.find_spec(f"zerotunnel.cli.{module}") is not None


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, (module, _) in _COMMANDS.items() if _module_present(module))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = _COMMANDS.get(cmd_name)
        if entry is None or not _module_present(entry[0]):
            return None
        module = importlib.import_module(f"zerotunnel.cli.{entry[0]}")
        command = getattr(module, entry[1])
        assert isinstance(command, click.Command)
        return command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zerotunnel")
def cli() -> None:
    """zerotunnel: a sidecar-less zero-trust service mesh (Istio ambient mode) in Python.

    It reads the same YAML you `kubectl apply` to Istio, issues SPIFFE identities from its own CA,
    carries pod traffic over mutual TLS (HBONE) and explains every authorization decision.
    """


def main() -> None:
    """Console entry point: bad input is one line on stderr and exit status 2."""
    try:
        # Without standalone mode click returns the code of `ctx.exit(n)` instead of exiting.
        code = cli.main(standalone_mode=False)
    except InputError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
