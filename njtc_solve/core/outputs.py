"""The one I/O module: atomic files and folders, the marks that tell a folder as this project's,
output locks, the output checks made before any work, and checked safetensors reading.

Labels name each output and input in messages: a parameter in backticks from library code
(``"`save_stats`"``), a flag from a command (``"--out"``). What this project did not write is
never replaced nor removed, ``overwrite`` or not.

Examples
--------
>>> import os
>>> from pathlib import Path
>>> _ = Path("stats.safetensors").write_bytes(b"x")
>>> os.link("stats.safetensors", "other-name.safetensors")      # one file, two names
>>> check_not_inputs([("--out", "fit.safetensors")], [("--stats", "stats.safetensors")])  # fine
>>> check_not_inputs([("--out", "other-name.safetensors")], [("--stats", "stats.safetensors")])
Traceback (most recent call last):
...
njtc_solve.core.errors.NJTCError: --out other-name.safetensors is --stats stats.safetensors: an output never replaces an input; choose another --out
>>> check_file_output("activations.h5", "--out", ["njtc-shortcuts"], "a shortcut file")
Traceback (most recent call last):
...
njtc_solve.core.errors.NJTCError: --out activations.h5 exists and is not a shortcut file this project wrote; remove it or choose another --out
>>> check_not_inputs([("`save_stats`", "other-name.safetensors")], [("`statistics`", "stats.safetensors")])
Traceback (most recent call last):
...
njtc_solve.core.errors.NJTCError: `save_stats` other-name.safetensors is `statistics` stats.safetensors: an output never replaces an input; choose another `save_stats`
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from collections.abc import Callable

from njtc_solve.core.errors import NJTCError

__all__ = ["FolderKind", "atomic_folder", "atomic_output", "check_file_output", "check_finite", "check_folder_output",
           "check_not_inputs", "check_writable", "is_locked", "output_lock", "read_safetensors", "temporary_path",
           "write_failure"]

_WRITTEN_FILES = "written_files"  # the marker's list of the entries this project wrote into a folder


def temporary_path(path) -> Path:
    """``PATH.partial``: the file written before it is renamed to ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def _lock_path(path) -> Path:
    """``PATH.lock``: the lock file held while ``path`` is written."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _same_file(a, b) -> bool:
    """Whether paths ``a`` and ``b`` name one file: equal once resolved, or the same inode."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies inside ``folder`` (resolved)."""
    try:
        return Path(path).resolve().is_relative_to(Path(folder).resolve()) and Path(folder).is_dir()
    except OSError:
        return False


def check_not_inputs(outputs, inputs, replaced_folders=()) -> None:
    """Refuse an output that is an input or another output (resolved paths and inodes), or lies in an input's folder.

    Parameters
    ----------
    outputs, inputs : iterable of (label, path)
        What is written (with its ``.partial`` and ``.lock`` files) and read; ``None`` paths are skipped.
    replaced_folders : iterable of (label, path)
        Folders replaced as a whole: no input may lie inside one.

    Raises
    ------
    NJTCError
        ``--out X is --stats Y: an output never replaces an input; choose another --out``, and the like.
    """
    outs = [(label, Path(p)) for label, p in outputs if p is not None]
    ins = [(label, Path(p)) for label, p in inputs if p is not None]
    for i, (label, out) in enumerate(outs):
        for other, path in ins + outs[:i]:
            for written in (out, temporary_path(out), _lock_path(out)):
                if _same_file(written, path):
                    what = "an output never replaces an input" if (other, path) in ins else "two outputs are one file"
                    via = "" if written == out else f" (written through {written.name})"
                    raise NJTCError(f"{label} {out}{via} is {other} {path}: {what}; choose another {label}")
        for other, path in ins:
            if path.is_dir() and _inside(out, path):
                raise NJTCError(f"{label} {out} is inside {other} {path}: an output never goes into an input's "
                                f"folder; choose another {label}")
    for label, folder in replaced_folders:
        for other, path in ins:
            if _inside(path, folder):
                raise NJTCError(f"{label} would replace the folder {folder}, which holds {other} {path}; "
                                f"choose another {label}")


def check_writable(folder, target=None) -> None:
    """Refuse a folder that does not exist or where no file can be created (tried: ``os.access`` misleads root)."""
    folder = Path(folder)
    target = folder if target is None else target
    if not folder.is_dir():
        raise NJTCError(f"cannot write {target}: folder {folder} does not exist")
    probe = folder / f".njtc-write-test-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        raise NJTCError(f"cannot write {target}: folder {folder} is not writable ({err.strerror})") from None
    os.close(fd)
    probe.unlink(missing_ok=True)


def _file_format(path) -> str | None:
    """The ``format`` a file of this project records (safetensors metadata, HDF5 attribute, JSON key), else ``None``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    if head.startswith(b"\x89HDF"):
        try:
            import h5py

            with h5py.File(path, "r") as f:
                value = f.attrs.get("format")
            return value.decode() if isinstance(value, bytes) else (str(value) if value is not None else None)
        except Exception:  # damaged or locked: not recognisably ours
            return None
    if head[:1] == b"{":
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value.get("format") if isinstance(value, dict) and isinstance(value.get("format"), str) else None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:  # safetensors raises several error types for a foreign file
        return None


def check_file_output(path, label: str, formats, what: str, overwrite: bool = False) -> Path:
    """Refuse an output file that cannot be written, or that exists and is not one this project wrote.

    Parameters
    ----------
    path : path
    label : str
        The output's name in messages.
    formats : iterable of str
        The ``format`` values (recorded in the file: metadata, attribute or JSON key) of the files it may replace.
    what : str
        What such a file is (``"a shortcut file"``).
    overwrite : bool
        Replace whatever is there.
    """
    path = Path(path)
    if path.is_dir():
        raise NJTCError(f"{label} {path} is a folder; give a file name")
    check_writable(path.parent, path)
    if path.exists() and not overwrite and _file_format(path) not in set(formats):
        raise NJTCError(f"{label} {path} exists and is not {what} this project wrote; remove it or choose "
                        f"another {label}")
    return path


def check_folder_output(folder, label: str, names, kind: FolderKind, advice: str = "",
                        parents: bool = False) -> Path:
    """Refuse an output folder that cannot be written, or where a write of ``names`` would replace a file
    this project did not write.

    Parameters
    ----------
    folder : path
        Created later if missing.
    label : str
        The output's name in messages.
    names : iterable of str
        The files written into it (``fnmatch`` patterns).
    kind : FolderKind
    advice : str
        The end of the refusal (default: move the file away or choose another folder).
    parents : bool
        Missing parent folders are created: the nearest existing one must be writable.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NJTCError(f"{label} {folder} exists and is not a folder")
    base = folder if folder.is_dir() else folder.parent
    while parents and not base.exists() and base != base.parent:
        base = base.parent
    if base.exists() and not base.is_dir():
        raise NJTCError(f"cannot write {folder}: {base} is not a folder")
    check_writable(base, folder)
    if folder.is_dir():
        foreign = kind.foreign(folder, names)
        if foreign and not kind.shared and not kind.is_own(folder):
            raise NJTCError(f"{label} {folder} holds files this project did not write ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); {advice or f'choose another {label}'}")
        if foreign:
            raise NJTCError(f"{label} {folder} holds {foreign[0]}, which this project did not write and never "
                            f"replaces; {advice or f'move it away or choose another {label}'}")
    return folder


@dataclass(frozen=True)
class FolderKind:
    """One kind of output folder, and how a later run knows it as this project's.

    Attributes
    ----------
    what : str
        What it holds, for messages (``"a tuned lens"``).
    marker : str
        The JSON file that marks the folder as this project's.
    recognise : callable
        ``recognise(content) -> bool``: whether the marker's content is this kind's.
    names : tuple of str
        The files the writer puts there (``fnmatch`` patterns), for a marker that lists none.
    shared : bool
        The folder may hold the user's files (``runs/``, ``.``); otherwise an existing one must be
        empty or this kind's.
    lists_files : bool
        The marker lists the entries written (``written_files``).
    """

    what: str
    marker: str
    recognise: Callable
    names: tuple = ()
    shared: bool = False
    lists_files: bool = True

    def marker_content(self, folder) -> dict | None:
        """The marker's JSON content when ``folder`` is this kind's, else ``None``."""
        try:
            content = json.loads((Path(folder) / self.marker).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return content if isinstance(content, dict) and self.recognise(content) else None

    def is_own(self, folder) -> bool:
        """Whether ``folder`` carries this kind's marker."""
        return self.marker_content(folder) is not None

    def owned(self, folder) -> set[str]:
        """Names of the entries of ``folder`` this project wrote (none where it is not this kind's)."""
        folder = Path(folder)
        content = self.marker_content(folder)
        if content is None:
            return set()
        entries = {p.name for p in folder.iterdir()}
        listed = content.get(_WRITTEN_FILES)
        if isinstance(listed, list):
            return entries & ({str(n) for n in listed} | {self.marker})
        return {n for n in entries if n == self.marker or any(fnmatch(n, pattern) for pattern in self.names)}

    def foreign(self, folder, names=None) -> list[str]:
        """Sorted entries of ``folder`` this project did not write that a write of ``names`` would replace
        (every entry of an unmarked folder that is not ``shared``)."""
        folder = Path(folder)
        if not folder.is_dir():
            return []
        entries = sorted(p.name for p in folder.iterdir())
        if not self.shared and not self.is_own(folder):
            return entries
        own = self.owned(folder)
        patterns = tuple(self.names if names is None else names) + (self.marker,)
        return [n for n in entries if n not in own and any(fnmatch(n, pattern) for pattern in patterns)]


def _mark(tmp: Path, kind: FolderKind, written) -> None:
    """Record ``written`` in the marker inside ``tmp``."""
    content = json.loads((tmp / kind.marker).read_text(encoding="utf-8"))
    content[_WRITTEN_FILES] = sorted(written)
    with atomic_output(tmp / kind.marker) as part:
        part.write_text(json.dumps(content, indent=1, default=str) + "\n", encoding="utf-8")


@contextmanager
def atomic_folder(out, kind: FolderKind, *, label: str = "`out`", parents: bool = False):
    """Yield a temporary sibling folder (``.OUT.partial-PID``) to write ``out`` into; swap it in on success.

    A new ``out``, or a wholly-ours one of a kind that is not ``shared``, is replaced by one
    rename. Any other ``out`` gets the new files by one rename each, marker first, keeping the
    user's files; our files not written this time are removed. A failure while writing leaves
    ``out`` as it was. The writer must put ``kind.marker`` into the folder; ``parents`` creates
    ``out``'s missing parents.

    Raises
    ------
    NJTCError
        ``out`` (checked again at the swap) holds a file this project did not write under a name
        it would write, or cannot be written.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if parents:
            out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        written = {p.name for p in tmp.iterdir()}
        if kind.marker not in written or not kind.recognise(json.loads((tmp / kind.marker).read_text("utf-8"))):
            raise RuntimeError(f"the writer of {kind.what} put no marker {kind.marker} into {tmp}")
        if kind.lists_files:
            _mark(tmp, kind, written)
        _swap(tmp, out, kind, written, label)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = write_failure(err)
        if reason is None:
            raise
        raise NJTCError(f"cannot write {out}: {reason}") from err


def _swap(tmp: Path, out: Path, kind: FolderKind, written: set, label: str) -> None:
    """Put the entries of ``tmp`` into ``out`` (see :func:`atomic_folder`)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    check_folder_output(out, label, sorted(written), kind)  # again: the folder may have changed since
    before = {p.name for p in out.iterdir()}
    own = kind.owned(out)
    if before <= own and not kind.shared:  # nothing of the user's inside: one rename (never a shared folder, `.`)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    stale = own - written - {kind.marker}
    if kind.lists_files:  # a failure part way leaves every file of ours marked as ours
        _mark(tmp, kind, written | stale)
    for name in [kind.marker] + sorted(written - {kind.marker}):
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    for name in stale:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
    if kind.lists_files:
        _mark(out, kind, written)
    tmp.rmdir()


@contextmanager
def output_lock(path):
    """Hold ``PATH.lock`` (``filelock``) for the block; a second holder is refused at once in one line."""
    from filelock import FileLock, Timeout

    path = Path(path)
    lock = FileLock(_lock_path(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise NJTCError(f"{path} is being written by another process (it holds {_lock_path(path).name}); "
                        "wait for it to finish or choose another `out`") from None
    except OSError as err:
        raise NJTCError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        yield
    finally:  # the file goes while still held (a peer that opened it then finds it unlinked and retries)
        _lock_path(path).unlink(missing_ok=True)
        lock.release()


def is_locked(path) -> bool:
    """Whether another holder has the output lock of ``path`` (:func:`output_lock`)."""
    from filelock import FileLock, Timeout

    if not _lock_path(path).exists():
        return False
    try:
        with FileLock(_lock_path(path), timeout=0):
            return False
    except Timeout:
        return True
    except OSError:
        return False


@contextmanager
def atomic_output(path, overwrite: bool = True):
    """Yield ``PATH.partial``, renamed to ``path`` when the block succeeds, removed otherwise.

    A failure to write becomes the one-line :class:`NJTCError` ``cannot write PATH: reason``.

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
    """The operating system's reason, on one line, when ``err`` is a failure to write (an OSError, HDF5's
    errno message, a safetensors I/O error), else None."""
    from safetensors import SafetensorError

    found = re.search(r"errno = \d+, error message = '([^']+)'", str(err))
    if found:
        return found[1]
    if isinstance(err, OSError):
        return (str(err.strerror or err).strip().splitlines() or [type(err).__name__])[0]
    if isinstance(err, SafetensorError):
        found = re.search(r'([^:]*\(os error \d+\))|Os \{.*message: "([^"]*)"', str(err))
        return found and (found[1] or found[2]).strip()
    return None


def check_finite(tensors: dict, where, dtype=None) -> None:
    """Refuse tensors with a non-finite value as stored in ``dtype`` (default: their own).

    Raises
    ------
    NJTCError
        ``WHERE: J[3] is not finite float16 (beyond its range, ±65504)``.
    """
    import torch

    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        stored = tensor if dtype is None else tensor.to(dtype)
        if not bool(torch.isfinite(stored).all()):
            finite_before = dtype is not None and bool(torch.isfinite(tensor).all())
            beyond = f" (beyond its range, ±{torch.finfo(dtype).max:.6g})" if finite_before else ""
            raise NJTCError(f"{where}: {name} is not finite {str(stored.dtype).replace('torch.', '')}{beyond}")


def read_safetensors(path, what: str, fmt: str):
    """All tensors and the metadata of a safetensors file of format ``fmt``, every value finite; else an
    NJTCError naming ``what`` it should be."""
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
    check_finite(tensors, path)
    return tensors, meta
