"""Checks of a fit's inputs: saved statistics (a single-target or an all-pairs file) against the fit asked for."""

from __future__ import annotations

from pathlib import Path

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.outputs import check_not_inputs
from njtc_solve.solve.pair_statistics import _header, load_head, load_target_statistics, statistics_targets
from njtc_solve.solve.stats import Statistics

__all__ = ["check_fit_inputs", "check_input_norm", "pair_file", "saved_statistics"]


def check_fit_inputs(store, *, statistics, save_stats) -> None:
    """Refuse a ``save_stats`` that is an input, or nothing to fit from."""
    if save_stats is not None:  # the library's callers are held to what the command checks
        check_not_inputs([("`save_stats`", save_stats)], [("`statistics`", statistics if isinstance(
            statistics, (str, Path)) else None), ("`store`", getattr(store, "path", None))])
    if store is None and statistics is None:
        raise NJTCError("nothing to fit from: give a store, a model or saved statistics")


def check_input_norm(input_norm: str, normalize: str) -> None:
    """Refuse statistics of ``input_norm`` inputs for a fit with ``normalize``."""
    if normalize in ("layer", "rms") and input_norm != normalize:
        raise NJTCError(f"`normalize` {normalize} needs statistics of {normalize}-normalised inputs "
                        f"(these are of {input_norm!r})")
    if normalize in ("none", "batch") and input_norm != "none":
        raise NJTCError(f"`normalize` {normalize} needs statistics of raw inputs (these are {input_norm!r})")


def saved_statistics(statistics, spec, target_layer=None):
    """``(stats, head or None)`` of saved ``statistics`` checked against the fit ``spec``: target layer,
    row weights, skipped positions, input normalisation, finite values."""
    if isinstance(statistics, Statistics):
        stats, head = statistics, None
        held = int(stats.meta.get("target_layer", -1))
        if target_layer is not None and int(target_layer) != held:
            raise NJTCError(f"the statistics hold target layer {held}, not {target_layer}")
    else:
        held = statistics_targets(statistics)
        target = max(held) if target_layer is None else int(target_layer)
        stats, head = load_target_statistics(statistics, target), load_head(statistics)
        if head is not None and head.d_model != stats.cyy.shape[0]:
            raise NJTCError(f"{statistics} is not a valid statistics file: head.unembed has width {head.d_model}, "
                            f"expected the statistics' {stats.cyy.shape[0]}")
    stats, row_weight, skip_positions = stats.to(spec.device), spec.row_weight, spec.skip_positions
    if stats.meta.get("row_weight", "none") != row_weight:
        raise NJTCError(f"`weight` {'logits' if row_weight != 'none' else 'none'} needs statistics with row "
                        f"weights {row_weight!r} (these have {stats.meta.get('row_weight', 'none')!r})")
    stored_skip = stats.meta.get("provenance", {}).get("skip_positions")
    if skip_positions is not None and stored_skip is not None and skip_positions != stored_skip:
        raise NJTCError(f"the statistics leave out positions < {stored_skip}, not < {skip_positions}")
    check_input_norm(stats.input_norm, spec.normalize)
    stats.check_finite()  # a Statistics object from the caller, or a file's row count (its loader checked its values)
    return stats, head


def pair_file(statistics, layers, skip_positions):
    """``(held targets, sources, d_model, head, input_norm)`` of an all-pairs statistics file, its metadata
    checked against the fit asked for (the tensors are checked later)."""
    if statistics is None:
        raise NJTCError("nothing to fit from: give a store, a model or saved statistics")
    held = statistics_targets(statistics)
    info, meta = _header(statistics)
    if info.get("kind") != "pairs":
        raise NJTCError(f"{statistics} holds target layer {held[0]} only; target layer all needs statistics "
                        "saved by a fit of every target")
    stored_skip = meta.get("provenance", {}).get("skip_positions", skip_positions)
    if skip_positions is not None and stored_skip != skip_positions:
        raise NJTCError(f"the statistics leave out positions < {stored_skip}, not < {skip_positions}")
    stored = meta["sources"]
    sources = stored if layers is None else [int(l) for l in layers]
    absent = [l for l in sources if l not in stored]
    if absent:
        raise NJTCError(f"the statistics have no source layer {absent[0]} (they have {stored})")
    return held, sources, meta["d_model"], load_head(statistics), info["input_norm"]
