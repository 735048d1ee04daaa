"""The command layer: every parser, ``main`` and the glue from arguments to library calls.

One module per command, each run as ``njtc-<command>``, ``njtc <command>`` (:func:`main`) or
``python -m njtc_solve.<command>`` (the library module of that name hands its ``__main__`` over
to the command here):

=========  ==================================================================
extract    a model's residual stream over a corpus into an HDF5 store
fit        closed-form shortcut maps from a store, a live model or statistics
evaluate   held-out metrics of shortcut files, tuned and Jacobian lenses, a report
refine     gradient refinement of fitted maps on KL or MSE
export     shortcut maps as a tuned-lens or Jacobian-lens folder
lens       a live model read through its shortcuts, prompt by prompt
prune      a smaller checkpoint: K blocks removed, a closed-form map folded in
generate   the model's greedy text, drafted by a shortcut map and verified
=========  ==================================================================

No module outside this package imports :mod:`argparse` or reads a parsed namespace. Library
errors name the library's parameters in backticks (:class:`~njtc_solve.core.errors.NJTCError`);
:func:`command` rewrites them as the command's flags, so a command-line user reads
``--seq-len must be at least 2`` where a Python caller reads `` `seq_len` must be at least 2``.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import signal
import sys
from pathlib import Path

from njtc_solve.core.errors import NJTCError, interruptible

__all__ = ["COMMANDS", "command", "figure", "flags_of", "main", "prog", "run_cli", "translate", "warn"]

COMMANDS = ("extract", "fit", "evaluate", "refine", "export", "lens", "prune", "generate")



def prog(name: str) -> str:
    """The command as the user typed it: ``njtc-NAME`` or ``njtc NAME`` when run as that script, else
    ``python -m njtc_solve.NAME``."""
    script = Path(sys.argv[0]).name
    if script == f"njtc-{name}":
        return script
    return f"njtc {name}" if script == "njtc" else f"python -m njtc_solve.{name}"


def main(argv=None) -> int:
    """The ``njtc`` script: ``njtc COMMAND ARGS...`` runs ``njtc-COMMAND ARGS...`` (one of :data:`COMMANDS`)."""
    import importlib

    argv = sys.argv[1:] if argv is None else list(argv)
    usage = f"usage: njtc {{{','.join(COMMANDS)}}} ...  (njtc COMMAND --help for each)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"{usage}\nerror: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(f"njtc_solve.cli.{argv[0]}").run(argv[1:])


def figure(value, spec: str = ".3f") -> str:
    """A number as a person reads it: ``format(value, spec)``, or ``—`` (as wide) where it is undefined.

    Examples
    --------
    >>> figure(0.12345, "7.4f"), figure(float("nan"), "7.4f"), figure(None)
    (' 0.1235', '      —', '—')
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        width = re.match(r"\D*?(\d*)(?:\.|$|\D)", spec)[1]
        return f"{'—':>{int(width or 1)}}"
    return format(value, spec)


# `name` or `name=value` in a library message
_PARAMETER = re.compile(r"`([A-Za-z_]\w*)(?:=([^`\s]*))?`")


def flags_of(parser: argparse.ArgumentParser, **renames: str) -> dict[str, str]:
    """The flag that sets each parameter: a destination's first long option, then ``renames``.

    A switch ``--no-NAME`` also stands for ``NAME=False`` (``progress=False`` is ``--no-progress``).
    ``renames`` maps a library parameter (or ``parameter=value``) that is spelt otherwise on
    the command line to its flag, e.g. ``ranks="--rank"`` or ``**{"fit_intercept=False": "--no-intercept"}``.
    """
    flags = {}
    for action in parser._actions:  # argparse has no public list of its actions
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs:
            flags.setdefault(action.dest, longs[0])
            if action.dest.startswith("no_") and action.const is True:
                flags.setdefault(f"{action.dest[3:]}=False", longs[0])
    flags.update(renames)
    return flags


def translate(message: str, flags: dict[str, str]) -> str:
    """A library message with each backticked parameter it names rewritten as its flag.

    Examples
    --------
    >>> flags = {"seq_len": "--seq-len", "overwrite": "--overwrite", "progress=False": "--no-progress"}
    >>> translate("`seq_len` must be at least 2; pass `overwrite=True` or `progress=False`", flags)
    '--seq-len must be at least 2; pass --overwrite or --no-progress'
    >>> translate("`seq_len=1` is too short; `other` is left as it is", flags)
    '--seq-len 1 is too short; `other` is left as it is'
    """

    def flag(found: re.Match) -> str:
        name, value = found[1], found[2]
        if found[0][1:-1] in flags:
            return flags[found[0][1:-1]]
        if name not in flags:
            return found[0]
        return flags[name] if value in (None, "True") else f"{flags[name]} {value}"

    return _PARAMETER.sub(flag, message)


def command(build_parser, **renames: str):
    """Turn ``body(args, **extra)`` into the command's ``main(argv=None, **extra) -> int``.

    ``main`` parses ``argv`` with ``build_parser()`` and runs ``body``; an
    :class:`~njtc_solve.core.errors.NJTCError` from the library leaves it with its parameters
    rewritten as this command's flags (see :func:`flags_of` for ``renames``).
    """

    def wrap(body):
        @functools.wraps(body)
        def main(argv=None, **extra) -> int:
            parser = build_parser()
            args = parser.parse_args(argv)
            try:
                return body(args, **extra)
            except NJTCError as err:
                message = translate(str(err), flags_of(parser, **renames))
                if message == str(err):
                    raise
                raise NJTCError(message) from err

        return main

    return wrap


def warn(message: str, build_parser, **renames: str) -> None:
    """Print a library warning on one line of standard error, its parameters as the command's flags."""
    print(f"warning: {translate(message, flags_of(build_parser(), **renames))}", file=sys.stderr)


def run_cli(main, argv=None, interrupted: str = "") -> int:
    """Run a command-line ``main(argv)`` and map :class:`~njtc_solve.core.errors.NJTCError` to exit code 2.

    SIGINT and SIGTERM raise :class:`~njtc_solve.core.errors.Interrupted`, so the command's
    clean-up runs, and end in one line (``error: interrupted``, then ``interrupted``'s advice)
    and exit code 128 + signal.

    Parameters
    ----------
    main : callable
        Takes the argument list, returns ``None`` or an exit code.
    argv : list of str, optional
        Arguments; ``sys.argv[1:]`` when omitted.
    interrupted : str
        Advice after an interruption, e.g. ``"resume with --resume"``.

    Returns
    -------
    int
        The process exit status.
    """
    try:
        with interruptible():
            code = main(sys.argv[1:] if argv is None else argv)
    except NJTCError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print("error: interrupted" + (f"; {interrupted}" if interrupted else ""), file=sys.stderr)
        return 128 + getattr(err, "signum", signal.SIGINT)
    return int(code or 0)
