"""The `zerotunnel` entry point: exit codes survive click's non-standalone mode."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from zerotunnel.cli import main as main_module
from zerotunnel.errors import InputError


def _run(monkeypatch: pytest.MonkeyPatch, command: click.Command, *args: str) -> int:
    monkeypatch.setitem(main_module._COMMANDS, command.name or "x", ("main", "_probe"))
    monkeypatch.setattr(main_module, "_probe", command, raising=False)
    monkeypatch.setattr(sys, "argv", ["zerotunnel", command.name or "x", *args])
    with pytest.raises(SystemExit) as exc:
        main_module.main()
    return int(exc.value.code or 0)


def test_ctx_exit_code_is_passed_through(monkeypatch: pytest.MonkeyPatch) -> None:
    @click.command("probe")
    @click.pass_context
    def probe(ctx: click.Context) -> None:
        ctx.exit(1)

    assert _run(monkeypatch, probe) == 1


def test_input_error_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    @click.command("probe")
    def probe() -> None:
        raise InputError("the file x.yaml does not exist")

    assert _run(monkeypatch, probe) == 2
    assert capsys.readouterr().err == "error: the file x.yaml does not exist\n"


def test_usage_error_exit_2_and_success_exit_0(monkeypatch: pytest.MonkeyPatch) -> None:
    @click.command("probe")
    @click.option("--n", type=int)
    def probe(n: int | None) -> None:
        pass

    assert _run(monkeypatch, probe, "--n", "x") == 2
    assert _run(monkeypatch, probe) == 0


def test_installed_command_help_lists_subcommands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "zerotunnel", "--help"], capture_output=True, text=True, check=True
    )
    assert "ca" in out.stdout and "demo-app" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "zerotunnel", "no-such-command"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "No such command" in bad.stderr
