"""Closed-form early-exit shortcut maps (JTC, NJTC, N-NJTC) for transformer language models.

Examples
--------
>>> from njtc_solve import fit_shortcuts, evaluate_shortcuts
>>> [nnjtc] = fit_shortcuts("activations.h5", method="nnjtc", ranks=[4], progress=False)
>>> nnjtc.save("nnjtc.safetensors")
>>> result = evaluate_shortcuts("activations.h5", ["nnjtc.safetensors"], progress=False)
>>> sorted({record["method"] for record in result.records})
['identity', 'nnjtc-layer-r4']
"""

import sys
from importlib import import_module

__version__ = "0.1.0"

# name -> module; imported on first use so `python -m njtc_solve.<stage>` runs cleanly.
_API = {
    "NJTCError": "errors",
    "ActivationStore": "store",
    "StoreWriter": "store",
    "LiveSource": "sources",
    "plan_extraction": "plan",
    "RowSource": "rows",
    "check_compatible": "compatibility",
    "Head": "head",
    "load_model": "models",
    "load_corpus": "corpus",
    "extract_activations": "extract",
    "accumulate_statistics": "fit",
    "fit_from_statistics": "fit",
    "fit_shortcuts": "fit",
    "evaluate_shortcuts": "evaluate",
    "refine_shortcuts": "refine",
    "train_maps": "train",
    "EvaluationResult": "evaluate",
    "Statistics": "stats",
    "MomentAccumulator": "stats",
    "solve_reduced_rank": "solvers",
    "gcv_alpha": "solvers",
    "Shortcuts": "shortcuts",
    "ShortcutMap": "shortcuts",
    "ReducedRankRegressor": "estimator",
    "ShortcutLens": "lens",
    "export_tuned_lens": "export",
    "read_tuned_lens": "export",
    "prune_model": "pruning",
    "PruneResult": "pruning",
    "Replacement": "replace",
    "ReplacementAccumulator": "replace",
    "solve_replacement": "replace",
    "apply_replacement": "replace",
    "save_pruned": "replace",
}

__all__ = list(_API)

def _run_as_a_stage() -> bool:
    """Whether this process is ``python [options] -m njtc_solve[.stage]`` (not a library import)."""
    argv = getattr(sys, "orig_argv", [])
    return sys.argv[:1] == ["-m"] and "-m" in argv[:-1] and argv[argv.index("-m") + 1].split(".")[0] == __name__


if _run_as_a_stage():  # no traceback for Ctrl-C while torch imports
    from .errors import quiet_start

    quiet_start()


def __getattr__(name):
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'njtc_solve' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
