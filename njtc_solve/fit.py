"""``python -m njtc_solve.fit``: runs the command :mod:`njtc_solve.cli.fit`."""

if __name__ == "__main__":
    from njtc_solve.cli.fit import run

    raise SystemExit(run())
