"""Errors caused by what the user asked for, as opposed to bugs.

A `UserError` is printed as one line and ends the process with exit code 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

from typing import Any

# Exit status of a job stopped by SIGTERM/SIGUSR1 after writing its resume checkpoint (128 + SIGTERM, what a
# shell reports for a process the signal ended): schedulers and wrappers see an interrupted job, not a result.
PREEMPTED_EXIT_CODE = 143


class UserError(Exception):
    """Bad input: a config value, a missing file, an impossible combination."""


class InvalidValue(UserError):
    """`key=value` is outside what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")

    def under(self, prefix: str) -> "InvalidValue":
        """The same error with its key qualified by the config node it came from."""
        return InvalidValue(f"{prefix}.{self.key}", self.value, self.allowed)


def check(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raise `InvalidValue` unless `condition` holds: the one-liner schemas use in `__post_init__`."""
    if not condition:
        raise InvalidValue(key, value, allowed)
