"""``python -m njtc_solve.prune``: a hand-over to the command, :mod:`njtc_solve.cli.prune`."""

from njtc_solve.cli.prune import run

raise SystemExit(run())
