"""Statistics under a memory budget: the bytes a pass keeps, and the layers split into passes.

When the layers' float64 statistics do not fit in the device's memory, the fit runs one pass per
group of layers; every group shifts by the same first chunk, so the maps equal those of one pass.

Examples
--------
>>> parse_size("40GB"), parse_size("512MiB"), parse_size(1000)
(40000000000, 536870912, 1000)
>>> layer_groups(list(range(80)), 8192, parse_size("80GB"))[0][:3], len(layer_groups(list(range(80)), 8192, 80e9))
([0, 1, 2], 3)
"""

from __future__ import annotations

import math
import os
import re
from numbers import Integral, Real

import torch

from njtc_solve.core.errors import NJTCError
from njtc_solve.solve.stats import NORM_BINS

__all__ = ["FREE_FRACTION", "accumulator_bytes", "check_budget", "chunk_bytes", "default_budget", "format_size",
           "free_memory", "join_layers", "layer_groups", "merge_fits", "one_jump_bytes", "pair_pass_bytes", "parse_size",
           "pass_bytes", "target_groups"]

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_LARGEST = 2 ** 63  # bytes: no memory is larger; beyond it a size is a typo
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(size, name: str = "max_memory") -> int:
    """Bytes of a size: a number of bytes, or text such as ``40GB`` (10⁹), ``512MiB`` (2²⁰), ``1.5TB``;
    refuses one that is not positive, not finite or beyond ``2**63`` bytes, naming ``name``."""
    if isinstance(size, Real) and not isinstance(size, bool):
        value = float(size)
    elif isinstance(size, str) and (match := _SIZE.match(size)) and match.group(2).lower() in _UNITS:
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    else:
        raise NJTCError(f"`{name}` must be a size such as 40GB, 512MiB or a number of bytes, not {size!r}")
    if not math.isfinite(value):
        raise NJTCError(f"`{name}` must be a finite size: {size!r} is not finite")
    if value > _LARGEST:
        raise NJTCError(f"`{name}` must be a size no larger than 2**63 bytes, not {size!r}")
    if value < 1:
        raise NJTCError(f"`{name}` must be a positive size, not {size!r}")
    return int(value)


def format_size(n_bytes: float) -> str:
    """``n_bytes`` in decimal units: ``86.0 GB``, ``268.4 MB``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{int(n_bytes)} B"


FREE_FRACTION = 0.9  # of the free memory, the default budget: the rest for the model's activations and the solves


def default_budget(device) -> int:
    """The budget without ``max_memory``: :data:`FREE_FRACTION` of :func:`free_memory` of ``device``."""
    return int(FREE_FRACTION * free_memory(device))


def free_memory(device) -> int:
    """Bytes free on ``device``: the GPU's free memory, or the available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def accumulator_bytes(n_layers: int, d: int) -> int:
    """Bytes of a :class:`~njtc_solve.solve.stats.MomentAccumulator`'s float64 buffer for ``n_layers``
    source layers of width ``d`` (what its ``allocate`` allocates).

    >>> round(accumulator_bytes(80, 8192) / 1e9, 1)  # Llama-2-70B: every layer at once
    86.4
    """
    return 8 * (2 + d + d * d + NORM_BINS + n_layers * (d + d * (2 * d)))


def chunk_bytes(n_rows: int, d: int, chunk_rows: int, float64: bool = False) -> int:
    """Bytes of one chunk of ``chunk_rows`` rows of ``n_rows`` layers of width ``d`` while a pass adds it
    (as read, the next chunk read ahead, the normalised copy and the GEMM's ``[x | y]`` block).

    >>> round(chunk_bytes(81, 8192, 4096) / 1e9, 1)  # Llama-2-70B: every layer of a chunk at once
    32.9
    """
    item = 8 if float64 else 4
    return chunk_rows * d * (n_rows * (2 * 4 + item) + 2 * item)


def one_jump_bytes(n_layers: int, d: int) -> int:
    """Bytes a one-jump solve (:mod:`~njtc_solve.solve.one_jump`) adds to its pass's statistics."""
    return 8 * d * d * (5 * n_layers + 3)


def pass_bytes(n_layers: int, d: int, chunk_rows: int = 0, *, float64: bool = False, one_jump: bool = False) -> int:
    """Bytes a single-target pass over ``n_layers`` source layers holds at its peak: the accumulator, the
    centred statistics beside it, one chunk, and with ``one_jump`` the moments of its solve."""
    return (accumulator_bytes(n_layers, d) + 8 * (d * d + d + n_layers * (2 * d * d + d))
            + chunk_bytes(n_layers + 1, d, chunk_rows, float64) + (one_jump_bytes(n_layers, d) if one_jump else 0))


def pair_pass_bytes(sources, targets, d: int, chunk_rows: int = 0, *, float64: bool = False) -> int:
    """Bytes of an all-pairs pass (:class:`~njtc_solve.solve.pair_statistics.PairAccumulator`) of
    ``targets`` against every source below them, and one chunk of their rows."""
    below = {t: sum(s < t for s in sources) for t in targets}
    used = [s for s in sources if targets and s < max(targets)]
    return (8 * (len(used) * (d * d + d) + sum((below[t] + 1) * d * d + d + NORM_BINS for t in targets))
            + chunk_bytes(len(set(used) | set(targets)), d, chunk_rows, float64))


def _refuse(what: str, need: int, budget: int) -> NJTCError:
    """The refusal of a budget that cannot hold ``what``."""
    return NJTCError(f"`max_memory` {format_size(budget)} cannot hold the statistics of {what} "
                     f"({format_size(need)}): raise it, or fit on a device with more memory")


def layer_groups(layers, d: int, budget: int, **sizes) -> list[list[int]]:
    """``layers`` in the fewest, most even passes whose statistics (:func:`pass_bytes` of ``sizes``) fit
    in ``budget`` bytes; refuses a budget that cannot hold one layer."""
    layers = list(layers)
    if not layers:
        return []
    if pass_bytes(1, d, **sizes) > budget:
        raise _refuse(f"one layer of width {d}", pass_bytes(1, d, **sizes), budget)
    per_pass = 1
    while per_pass < len(layers) and pass_bytes(per_pass + 1, d, **sizes) <= budget:
        per_pass += 1
    n_passes = -(-len(layers) // per_pass)
    size, extra = divmod(len(layers), n_passes)
    groups, start = [], 0
    for i in range(n_passes):
        end = start + size + (i < extra)
        groups.append(layers[start:end])
        start = end
    return groups


def target_groups(sources, targets, d: int, budget: int, **sizes) -> list[list[int]]:
    """The ``targets`` of an all-pairs fit (ascending) in passes of whole targets whose statistics
    (:func:`pair_pass_bytes` of ``sizes``) fit in ``budget`` bytes; refuses a target that cannot fit alone."""
    targets = sorted(targets)
    for t in targets:
        if pair_pass_bytes(sources, [t], d, **sizes) > budget:
            raise _refuse(f"target layer {t} and its {sum(s < t for s in sources)} source layers",
                          pair_pass_bytes(sources, [t], d, **sizes), budget)
    groups = []
    for t in targets:
        if groups and pair_pass_bytes(sources, groups[-1] + [t], d, **sizes) <= budget:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def join_layers(parts: list) -> list:
    """The first list of :class:`~njtc_solve.maps.shortcuts.Shortcuts` (one per rank) with the maps and
    per-layer records of the others joined in, in layer order."""
    merged = parts[0]
    for part in parts[1:]:
        for into, sc in zip(merged, part):
            into.maps.update(sc.maps)
            into.stats["layers"].update(sc.stats["layers"])
    for sc in merged:
        sc.maps = dict(sorted(sc.maps.items()))
        sc.stats["layers"] = dict(sorted(sc.stats["layers"].items()))
    return merged


def merge_fits(parts: list) -> list:
    """The fits of several passes joined (:func:`join_layers`), their seconds added and rates over all."""
    merged = join_layers(parts)
    for i, sc in enumerate(merged):
        timing = [p[i].stats.get("accumulation", {}) for p in parts]
        seconds = [t.get("seconds") for t in timing]
        if len(parts) > 1 and all(isinstance(s, Real) for s in seconds):
            total = sum(seconds)
            acc = sc.stats["accumulation"]
            acc.update(seconds=total, rows_per_s=acc["rows_per_s"] * seconds[0] / total,
                       gflops=sum(t["gflops"] * s for t, s in zip(timing, seconds)) / total, passes=len(parts))
    return merged


def check_budget(max_memory) -> int | None:
    """A ``max_memory`` setting in bytes (``None`` stays ``None``: the device's free memory)."""
    if max_memory is None:
        return None
    if isinstance(max_memory, Integral) and not isinstance(max_memory, bool) and max_memory < 1:
        raise NJTCError(f"`max_memory` must be a positive size, not {max_memory!r}")
    return parse_size(max_memory)
