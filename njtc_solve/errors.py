"""User-facing errors, the command-line wrapper that prints them on one line, and safe file I/O."""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

__all__ = ["NJTCError", "atomic_output", "run_cli"]


class NJTCError(Exception):
    """Bad input or a failed check that the user can act on.

    The command-line tools print its message on one line and exit with status 2.
    """


def run_cli(main, argv=None) -> int:
    """Run a command-line ``main(argv)`` and map :class:`NJTCError` to exit code 2.

    Parameters
    ----------
    main : callable
        Takes the argument list, returns ``None`` or an exit code.
    argv : list of str, optional
        Arguments; ``sys.argv[1:]`` when omitted.

    Returns
    -------
    int
        The process exit status.
    """
    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except NJTCError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


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
        raise NJTCError(f"{path} exists; pass --overwrite to replace it")
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
        reason = _write_failure(err)
        if reason is None:
            raise
        raise NJTCError(f"cannot write {path}: {reason}") from err


def _write_failure(err: BaseException) -> str | None:
    """The OS's reason when ``err`` is a failure to write, else None.

    safetensors reports one as ``SafetensorError("Error while serializing: I/O error: No space
    left on device (os error 28)")`` (older versions: ``IoError(Os { code: 28, ..., message: "..." })``).
    """
    if isinstance(err, OSError):
        return err.strerror or str(err)
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
