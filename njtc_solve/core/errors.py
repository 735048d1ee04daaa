"""User-facing errors and interruption as an exception (the command layer, :mod:`njtc_solve.cli`,
prints the errors on one line). File I/O is :mod:`njtc_solve.core.outputs`."""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager

__all__ = ["Interrupted", "NJTCError", "interruptible", "quiet_start"]


class NJTCError(Exception):
    """Bad input or a failed check that the user can act on.

    The command-line tools print its message on one line and exit with status 2. A message
    names the parameters of the function that raised it in backticks (`` `seq_len` must be at
    least 2``); the command layer rewrites them as its flags (``--seq-len``).
    """


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a command: raised so that every ``finally`` runs."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _exit_at_start(signum, frame):
    sys.stderr.write("error: interrupted\n")
    os._exit(128 + signum)


def quiet_start() -> None:
    """Exit with one line, not a traceback, on Ctrl-C or SIGTERM while a command imports its
    libraries (seconds for torch); the package calls it when run as ``python -m njtc_solve.…``.
    Nothing is open yet, so exiting at once is safe; :func:`interruptible` takes over from there."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_at_start)


@contextmanager
def interruptible():
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted`, so that every
    ``finally`` (a partial file's clean-up, a lock's release) runs; the handlers before are
    restored after it."""
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
