"""``python -m njtc_solve.fit``: closed-form shortcut maps from a store, a live model or saved statistics.

Only a hand-over: the command is :mod:`njtc_solve.cli.fit`, the library behind it
:mod:`njtc_solve.solve.fit`. Importing this module does nothing.
"""

if __name__ == "__main__":
    from njtc_solve.cli.fit import run

    raise SystemExit(run())
