"""Closed-form early-exit shortcut maps (JTC, NJTC, N-NJTC) for transformer language models.

Examples
--------
>>> from njtc_solve import extract_activations, fit_shortcuts, evaluate_shortcuts   # doctest: +SKIP
>>> fit_shortcuts("activations.h5", method="nnjtc", ranks=[32])                     # doctest: +SKIP
"""

from importlib import import_module

__version__ = "0.1.0"

# name -> module; imported on first use so `python -m njtc_solve.<stage>` runs cleanly.
_API = {
    "NJTCError": "errors",
    "ActivationStore": "store",
    "Head": "head",
    "load_model": "models",
    "load_corpus": "corpus",
    "extract_activations": "extract",
    "accumulate_statistics": "fit",
    "fit_from_statistics": "fit",
    "fit_shortcuts": "fit",
    "Statistics": "stats",
    "MomentAccumulator": "stats",
    "solve_reduced_rank": "solvers",
    "gcv_alpha": "solvers",
    "Shortcuts": "shortcuts",
    "ShortcutMap": "shortcuts",
    "ReducedRankRegressor": "estimator",
}

__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'njtc_solve' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
