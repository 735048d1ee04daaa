"""User-facing errors and interruption as an exception (the command layer, :mod:`njtc_solve.cli`,
prints the errors on one line). File I/O is :mod:`njtc_solve.core.outputs`."""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager

__all__ = ["Interrupted", "NJTCError", "interruptible", "quiet_start"]


class NJTCError(Exception):
    """Bad input or a failed check the user can act on: one line, parameters in backticks, exit status 2."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a command: raised so that every ``finally`` runs."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    """Signal handler: raise :class:`Interrupted`."""
    raise Interrupted(signum)


def _exit_at_start(signum, frame):
    """Signal handler: one line, then exit at once."""
    sys.stderr.write("error: interrupted\n")
    os._exit(128 + signum)


def quiet_start() -> None:
    """Exit with one line, not a traceback, on Ctrl-C or SIGTERM while a command imports its libraries."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_at_start)


@contextmanager
def interruptible():
    """SIGINT and SIGTERM raise :class:`Interrupted` within the block, so every ``finally`` runs."""
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
