"""The command layer: one module per command (``njtc-<command>``, ``njtc <command>``,
``python -m njtc_solve[.cli].<command>``), the only place that sees argparse.

Library errors name parameters in backticks; :func:`command` rewrites them as the command's flags.
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

__all__ = ["COMMANDS", "command", "entry_point", "figure", "flags_of", "main", "prog", "run_cli", "translate", "warn"]

COMMANDS = ("extract", "fit", "evaluate", "refine", "export", "lens", "prune", "generate")


def prog(name: str) -> str:
    """The command as typed: ``njtc-NAME``, ``njtc NAME`` or ``python -m njtc_solve[.cli].NAME``."""
    script = Path(sys.argv[0])
    if script.name == f"njtc-{name}":
        return script.name
    if script.name == "njtc":
        return f"njtc {name}"
    return f"python -m njtc_solve.{'cli.' if script.parent.name == 'cli' else ''}{name}"


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
    """The flag of each parameter: a destination's first long option (``--no-NAME`` also for ``NAME=False``),
    then ``renames`` (parameter or ``parameter=value`` to flag, e.g. ``ranks="--rank"``)."""
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
    """Turn ``body(args, **extra)`` into ``main(argv=None, **extra) -> int``: parse with ``build_parser()``,
    run ``body``, and rewrite the parameters of an NJTCError as flags (:func:`flags_of`)."""

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
    """Run ``main(argv)`` as a process: an NJTCError is one line and exit status 2; SIGINT and SIGTERM
    run the clean-up and end in ``error: interrupted`` (then ``interrupted``'s advice), status 128 + signal.

    Parameters
    ----------
    main : callable
        Takes the argument list, returns ``None`` or an exit code.
    argv : list of str, optional
        Default ``sys.argv[1:]``.
    interrupted : str
        Advice after an interruption.

    Returns
    -------
    int
        The exit status.
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


def entry_point(main, interrupted: str = ""):
    """``run(argv=None) -> int``: the process entry point of a command's ``main`` (:func:`run_cli`)."""

    def run(argv=None) -> int:
        return run_cli(main, argv, interrupted)

    return run
