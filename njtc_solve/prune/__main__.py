"""``python -m njtc_solve.prune``: a smaller checkpoint, K blocks removed and a closed-form map folded in.

Only a hand-over to the command, :mod:`njtc_solve.cli.prune`.
"""

from njtc_solve.cli.prune import run

raise SystemExit(run())
