"""``python -m njtc_solve.evaluate``: held-out metrics of shortcut files and tuned lenses, and a report.

Only a hand-over: the command is :mod:`njtc_solve.cli.evaluate`, the library behind it
:mod:`njtc_solve.evaluation.evaluate`. Importing this module does nothing.
"""

if __name__ == "__main__":
    from njtc_solve.cli.evaluate import run

    raise SystemExit(run())
