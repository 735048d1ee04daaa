"""``python -m njtc_solve.lens``: runs the command :mod:`njtc_solve.cli.lens`."""

if __name__ == "__main__":
    from njtc_solve.cli.lens import run

    raise SystemExit(run())
