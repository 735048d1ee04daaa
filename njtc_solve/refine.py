"""``python -m njtc_solve.refine``: gradient refinement of fitted maps on KL or MSE.

Only a hand-over: the command is :mod:`njtc_solve.cli.refine`, the library behind it
:mod:`njtc_solve.solve.refine_shortcuts`. Importing this module does nothing.
"""

if __name__ == "__main__":
    from njtc_solve.cli.refine import run

    raise SystemExit(run())
