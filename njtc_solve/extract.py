"""``python -m njtc_solve.extract``: a model's residual stream over a corpus into an HDF5 store.

Only a hand-over: the command is :mod:`njtc_solve.cli.extract`, the library behind it
:mod:`njtc_solve.data.extract`. Importing this module does nothing.
"""

if __name__ == "__main__":
    from njtc_solve.cli.extract import run

    raise SystemExit(run())
