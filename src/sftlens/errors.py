"""One exception type for every user-facing problem.

Messages are ONE line that names the problem and the fix, e.g.
``SftlensError("mask '0110' has 4 characters but K=5 blocks; pass a 5-character mask like 01100")``.
The CLI prints ``error: <message>`` and exits with status 2 instead of a traceback.
"""

from __future__ import annotations


class SftlensError(Exception):
    """A problem with the user's input (models, data, config), not a bug in sftlens."""

    def __init__(self, message: str) -> None:
        message = " ".join(str(message).split())  # always one line
        super().__init__(message)
