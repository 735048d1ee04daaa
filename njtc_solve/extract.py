"""``python -m njtc_solve.extract``: runs the command :mod:`njtc_solve.cli.extract`."""

if __name__ == "__main__":
    from njtc_solve.cli.extract import run

    raise SystemExit(run())
