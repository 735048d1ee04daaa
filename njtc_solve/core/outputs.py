"""Output paths checked before the work: writable, never an input, never a file the project did not write.

Every command calls these on its outputs before it loads a model or reads a row, so a bad
``--out`` costs nothing and destroys nothing; library functions that write files call them too.
Each output and input carries a label that names it in the message: the parameter in backticks
from library code (``"`save_stats`"``), the flag from a command (``"--out"``):

- :func:`check_not_inputs`: no output (nor its ``.partial`` or ``.lock`` file beside it, nor a
  folder that would be replaced) is one of the command's inputs, comparing resolved paths
  and inodes (a hard link or a symbolic link to an input is that input);
- :func:`check_file_output`: an output file may replace only a file of the same kind that
  this project wrote (recognised by its ``format`` metadata);
- :func:`check_folder_output`: an output folder is writable, and the files the command would
  put there replace only files this project wrote (recognised by a marker file).

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
import uuid
from pathlib import Path

from njtc_solve.core.errors import NJTCError, temporary_path

__all__ = ["check_file_output", "check_folder_output", "check_not_inputs", "check_writable",
           "file_format", "same_file"]



def same_file(a, b) -> bool:
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
    """Refuse an output that is one of the inputs, or another output.

    Parameters
    ----------
    outputs : iterable of (label, path)
        The files a command writes (``None`` paths are skipped). Each is written through
        ``PATH.partial`` and guarded by ``PATH.lock``, which must not be inputs either. The
        label names the output in the message: ``"--out"`` (a command's flag) or ``"`out`"``
        (a library function's parameter).
    inputs : iterable of (label, path)
        What the command reads (``None`` paths are skipped), labelled alike.
    replaced_folders : iterable of (label, path)
        Folders the command deletes or replaces as a whole (a report's temporary folder):
        no input may lie inside one.

    Raises
    ------
    NJTCError
        ``--out X is --stats Y: an output never replaces an input; choose another --out``.
    """
    outs = [(label, Path(p)) for label, p in outputs if p is not None]
    ins = [(label, Path(p)) for label, p in inputs if p is not None]
    for i, (label, out) in enumerate(outs):
        for other, path in ins + outs[:i]:
            for written in (out, temporary_path(out), out.with_name(out.name + ".lock")):
                if same_file(written, path):
                    what = "an output never replaces an input" if (other, path) in ins else "two outputs are one file"
                    via = "" if written == out else f" (written through {written.name})"
                    raise NJTCError(f"{label} {out}{via} is {other} {path}: {what}; choose another {label}")
    for label, folder in replaced_folders:
        for other, path in ins:
            if _inside(path, folder):
                raise NJTCError(f"{label} would replace the folder {folder}, which holds {other} {path}; "
                                f"choose another {label}")


def check_writable(folder, target=None) -> None:
    """Refuse a folder that does not exist or where no file can be created (tried, not guessed).

    ``os.access`` says yes to root on a read-only folder and knows nothing of a read-only
    file system, so a file is created and removed.
    """
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


def file_format(path) -> str | None:
    """The ``format`` a file of this project records (safetensors metadata, HDF5 root attribute,
    JSON key), or ``None`` for any other file."""
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
        The output file.
    label : str
        How the caller names it, for the message: ``"--out"`` (a command's flag) or ``"`out`"``
        (a library function's parameter).
    formats : iterable of str
        The ``format`` values (see :func:`file_format`) of files it may replace.
    what : str
        What such a file is, for the message (``"a shortcut file"``).
    overwrite : bool
        Replace whatever is there (the user said so).
    """
    path = Path(path)
    if path.is_dir():
        raise NJTCError(f"{label} {path} is a folder; give a file name")
    check_writable(path.parent, path)
    if path.exists() and not overwrite and file_format(path) not in set(formats):
        raise NJTCError(f"{label} {path} exists and is not {what} this project wrote; remove it or choose "
                        f"another {label}")
    return path


def check_folder_output(folder, label: str, names, is_own, overwrite: bool = False,
                        advice: str = "", parents: bool = False) -> Path:
    """Refuse an output folder that cannot be written, or whose files the command would replace
    though this project did not write them.

    Parameters
    ----------
    folder : path
        The output folder (created later if missing; its parent must exist).
    label : str
        How the caller names it: ``"--out"`` (a command's flag) or ``"`out`"`` (a parameter).
    names : iterable of str
        The files the command writes into it.
    is_own : callable
        ``is_own(folder) -> bool``: the folder holds this project's output (its marker file).
    overwrite : bool
        Replace foreign files anyway.
    advice : str
        The end of the refusal (default: choose another folder).
    parents : bool
        The command creates missing parent folders too: the nearest existing one must be writable.
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
    if folder.is_dir() and not overwrite:
        clashing = [name for name in names if (folder / name).exists() or (folder / name).is_symlink()]
        if clashing and not is_own(folder):
            raise NJTCError(f"{label} {folder} holds {clashing[0]}, which this project did not write; "
                            f"{advice or f'choose another {label}'}")
    return folder
