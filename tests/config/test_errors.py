"""zerotunnel.config.errors: a problem reads as `file: document N (resource): path: message`."""

from __future__ import annotations

from zerotunnel.config.errors import ConfigError, ConfigProblem
from zerotunnel.errors import InputError


def test_problem_str() -> None:
    assert str(ConfigProblem("a.yaml", 2, "spec.action", "bad", "AuthorizationPolicy demo/p")) == (
        "a.yaml: document 2 (AuthorizationPolicy demo/p): spec.action: bad"
    )
    assert str(ConfigProblem("a.yaml", 0, "", "invalid YAML")) == "a.yaml: document 0: invalid YAML"


def test_error_lists_every_problem_one_per_line() -> None:
    problems = [ConfigProblem("a.yaml", 0, "x", "one"), ConfigProblem("b.yaml", 1, "y", "two")]
    error = ConfigError(problems)
    assert isinstance(error, InputError)
    assert error.errors == tuple(problems)
    assert str(error).splitlines() == [
        "invalid configuration (2 problems)",
        "a.yaml: document 0: x: one",
        "b.yaml: document 1: y: two",
    ]
    assert error.message == str(error)
    assert str(ConfigError(problems[:1])).splitlines()[0] == "invalid configuration (1 problem)"
