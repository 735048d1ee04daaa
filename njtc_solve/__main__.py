"""``python -m njtc_solve`` lists the stages."""

print("njtc_solve stages: python -m njtc_solve.extract | njtc_solve.fit | njtc_solve.evaluate  (--help on each)")
