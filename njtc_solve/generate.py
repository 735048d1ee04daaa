"""``python -m njtc_solve.generate``: the model's greedy text, drafted by a shortcut map and verified.

Only a hand-over: the command is :mod:`njtc_solve.cli.generate`, the library behind it
:mod:`njtc_solve.infer.speculative`. Importing this module does nothing.
"""

if __name__ == "__main__":
    from njtc_solve.cli.generate import run

    raise SystemExit(run())
