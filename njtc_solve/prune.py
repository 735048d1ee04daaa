"""``python -m njtc_solve.prune``: remove K consecutive blocks and ship a smaller model.

The command is :mod:`njtc_solve.cli.prune`; the library behind it is :mod:`njtc_solve.pruning`
(choosing and fitting the replacement) and :mod:`njtc_solve.replace` (its maths and the saved
checkpoint).
"""

from .errors import moved_names

__all__: list[str] = []

__getattr__ = moved_names(__name__, {"main": "njtc_solve.cli.prune"})

if __name__ == "__main__":
    from njtc_solve.cli.prune import run

    raise SystemExit(run())
