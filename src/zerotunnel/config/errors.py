"""Configuration errors: every problem in every document, reported together.

DESIGN.md §2: an error names the file, the document's index and the field path, says what was wrong and
what is accepted; a user fixing a manifest should not have to run the loader once per mistake.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from zerotunnel.errors import InputError


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem. `document` is the 0-based index of the YAML document in `file`; `path` is the
    field path inside it (`spec.rules[0].from[1].source.principals`), "" for the document itself;
    `resource` is `Kind ns/name` when the document got far enough to have one."""

    file: str
    document: int
    path: str
    message: str
    resource: str = ""

    def __str__(self) -> str:
        where = f"{self.file}: document {self.document}"
        if self.resource:
            where += f" ({self.resource})"
        if self.path:
            where += f": {self.path}"
        return f"{where}: {self.message}"


class ConfigError(InputError):
    """The configuration is invalid; `errors` holds every problem found, in file and document order."""

    def __init__(self, errors: Sequence[ConfigProblem]) -> None:
        self.errors: tuple[ConfigProblem, ...] = tuple(errors)
        count = len(self.errors)
        head = f"invalid configuration ({count} problem{'s' if count != 1 else ''})"
        super().__init__("\n".join([head, *(str(e) for e in self.errors)]))
