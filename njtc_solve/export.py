"""``python -m njtc_solve.export``: runs the command :mod:`njtc_solve.cli.export`."""

if __name__ == "__main__":
    from njtc_solve.cli.export import run

    raise SystemExit(run())
