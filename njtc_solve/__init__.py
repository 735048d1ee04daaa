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
    "NJTCError": "core.errors",
    "ActivationStore": "data.store",
    "StoreWriter": "data.store_writer",
    "LiveSource": "data.live",
    "plan_extraction": "data.plan",
    "PlanSpec": "data.plan",
    "RowSource": "data.rows",
    "check_compatible": "maps.compatibility",
    "Head": "core.head",
    "load_model": "core.models",
    "load_corpus": "data.corpus",
    "extract_activations": "data.extract",
    "accumulate_statistics": "solve.statistics_pass",
    "fit_from_statistics": "solve.fit",
    "fit_shortcuts": "solve.fit",
    "FitSpec": "solve.fit",
    "evaluate_shortcuts": "evaluation.evaluate",
    "EvaluateSpec": "evaluation.evaluate",
    "refine_shortcuts": "solve.refine_shortcuts",
    "RefineShortcutsSpec": "solve.refine_shortcuts",
    "train_maps": "solve.training",
    "EvaluationResult": "evaluation.evaluate",
    "Statistics": "solve.stats",
    "MomentAccumulator": "solve.stats",
    "solve_reduced_rank": "solve.solvers",
    "gcv_alpha": "solve.solvers",
    "Shortcuts": "maps.shortcuts",
    "ShortcutMap": "maps.shortcuts",
    "ReducedRankRegressor": "solve.estimator",
    "ShortcutLens": "evaluation.lens",
    "LensSpec": "evaluation.lens",
    "export_tuned_lens": "maps.tuned_lens",
    "read_tuned_lens": "maps.tuned_lens",
    "export_jacobian_lens": "maps.jacobian_lens",
    "read_jacobian_lens": "maps.jacobian_lens",
    "ShortcutDrafter": "infer.speculative",
    "speculative_generate": "infer.speculative",
    "GenerateSpec": "infer.speculative",
    "calibrate": "infer.calibrate",
    "prune_model": "prune.selection",
    "PruneResult": "prune.selection",
    "PruneSpec": "prune.selection",
    "RefineSpec": "prune.refine_fold",
    "RefineFoldSpec": "prune.refine_fold",
    "refine_fold": "prune.refine_fold",
    "ReplacementStatistics": "prune.replacement_statistics",
    "Replacement": "prune.replacement",
    "ReplacementAccumulator": "prune.replacement_statistics",
    "solve_replacement": "prune.replacement",
    "apply_replacement": "prune.replacement",
    "save_pruned": "prune.checkpoint",
}

__all__ = list(_API)

def _run_as_a_stage() -> bool:
    """Whether this process is ``python [options] -m njtc_solve[.stage]`` (not a library import)."""
    argv = getattr(sys, "orig_argv", [])
    return sys.argv[:1] == ["-m"] and "-m" in argv[:-1] and argv[argv.index("-m") + 1].split(".")[0] == __name__


if _run_as_a_stage():  # no traceback for Ctrl-C while torch imports
    from njtc_solve.core.errors import quiet_start

    quiet_start()


def __getattr__(name):
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'njtc_solve' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
