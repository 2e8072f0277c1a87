"""The root of every error zerotunnel raises on purpose.

DESIGN.md §5: errors that can reach a peer carry the HTTP status and the response flag a
client would see, so the shell that answers the peer never has to guess them.
"""

from __future__ import annotations


class ZerotunnelError(Exception):
    """Base class. `status` is the HTTP status a peer sees (0 when none reaches a peer)."""

    status: int = 0
    response_flag: str = ""

    def __init__(self, message: str, *, status: int | None = None, response_flag: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if response_flag is not None:
            self.response_flag = response_flag


class InputError(ZerotunnelError):
    """Bad input from a user (a file, a flag, a value): the CLI prints it on one line and exits 2."""
