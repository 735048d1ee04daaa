"""``python -m njtc_solve.evaluate``: runs the command :mod:`njtc_solve.cli.evaluate`."""

if __name__ == "__main__":
    from njtc_solve.cli.evaluate import run

    raise SystemExit(run())
