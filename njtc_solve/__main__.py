"""``python -m njtc_solve`` lists the commands."""

from njtc_solve.cli import COMMANDS

print("njtc_solve commands: " + " | ".join(f"python -m njtc_solve.{c}" for c in COMMANDS) + "  (--help on each)")
