"""``python -m njtc_solve.lens``: a live model read through its shortcuts, prompt by prompt.

Only a hand-over: the command is :mod:`njtc_solve.cli.lens`, the library behind it
:mod:`njtc_solve.evaluation.lens`. Importing this module does nothing.
"""

if __name__ == "__main__":
    from njtc_solve.cli.lens import run

    raise SystemExit(run())
