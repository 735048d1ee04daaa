"""``python -m njtc_solve.generate``: runs the command :mod:`njtc_solve.cli.generate`."""

if __name__ == "__main__":
    from njtc_solve.cli.generate import run

    raise SystemExit(run())
