"""User-facing errors, interruption as an exception, and safe file I/O (the command layer,
:mod:`njtc_solve.cli`, prints the errors on one line)."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

__all__ = ["Interrupted", "NJTCError", "atomic_output", "interruptible", "output_lock", "quiet_start",
           "read_safetensors", "temporary_path", "write_failure"]


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


@contextmanager
def output_lock(path):
    """Hold an exclusive lock on writing ``path`` for the block (a lock file beside it).

    A second process that asks for the same output while the first holds it is refused at
    once with a one-line :class:`NJTCError`; the lock is released on every path out.
    """
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise NJTCError(f"cannot write {path}: {err.strerror}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NJTCError(f"{path} is being written by another process (it holds {lock.name}); "
                            "wait for it to finish or choose another `out`") from None
        try:  # the holder before us may have removed the file it locked: then lock the new one
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def temporary_path(path: Path) -> Path:
    """Name of the file that is written before it is renamed to ``path``."""
    return path.with_name(path.name + ".partial")


@contextmanager
def atomic_output(path, overwrite: bool = True):
    """Yield a temporary path that replaces ``path`` only when the block succeeds.

    A failure to write (an :class:`OSError`, or a safetensors error wrapping one, such as a
    full disk) becomes the one-line :class:`NJTCError` ``cannot write PATH: reason``; on any
    exception the temporary file is removed and ``path`` is left as it was.

    Examples
    --------
    >>> with atomic_output("notes.txt") as tmp:
    ...     _ = tmp.write_text("complete")
    >>> Path("notes.txt").read_text(), tmp.exists()
    ('complete', False)
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise NJTCError(f"{path} exists; pass `overwrite=True` to replace it")
    if not path.parent.exists():
        raise NJTCError(f"cannot write {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise NJTCError(f"cannot write {path}: folder {path.parent} is not writable")
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        reason = write_failure(err)
        if reason is None:
            raise
        raise NJTCError(f"cannot write {path}: {reason}") from err


def write_failure(err: BaseException) -> str | None:
    """The operating system's reason, on one line, when ``err`` is a failure to write, else None.

    An :class:`OSError`; HDF5's long, multi-line message naming an errno (which h5py raises as
    OSError, ValueError or RuntimeError); or ``SafetensorError("Error while serializing: I/O
    error: No space left on device (os error 28)")`` (older versions: ``IoError(Os { code: 28,
    ..., message: "..." })``). Anything else is no write failure and is not disguised as one.
    """
    found = re.search(r"errno = \d+, error message = '([^']+)'", str(err))
    if found:
        return found[1]
    if isinstance(err, OSError):
        return (str(err.strerror or err).strip().splitlines() or [type(err).__name__])[0]
    if isinstance(err, SafetensorError):
        found = re.search(r'([^:]*\(os error \d+\))|Os \{.*message: "([^"]*)"', str(err))
        return found and (found[1] or found[2]).strip()
    return None


def read_safetensors(path, what: str, fmt: str):
    """Read all tensors and the metadata of a safetensors file of format ``fmt``.

    A missing, unreadable or foreign file is an :class:`NJTCError` naming ``what`` it should be.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise NJTCError(f"{what} file {path} not found")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several error types for a bad header
        raise NJTCError(f"{path} is not a readable safetensors file") from err
    if meta.get("format") != fmt:
        raise NJTCError(f"{path} is not an njtc {what} file")
    return tensors, meta
