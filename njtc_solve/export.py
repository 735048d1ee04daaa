"""``python -m njtc_solve.export``: shortcut maps as a tuned-lens folder.

Only a hand-over: the command is :mod:`njtc_solve.cli.export`, the library behind it
:mod:`njtc_solve.maps.tuned_lens`. Importing this module does nothing.
"""

if __name__ == "__main__":
    from njtc_solve.cli.export import run

    raise SystemExit(run())
