"""``python -m njtc_solve.refine``: runs the command :mod:`njtc_solve.cli.refine`."""

if __name__ == "__main__":
    from njtc_solve.cli.refine import run

    raise SystemExit(run())
