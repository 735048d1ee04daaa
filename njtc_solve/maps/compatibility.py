"""One check that fitted maps belong to what they are applied to: model, head, target layer, split."""

from __future__ import annotations

import json
from dataclasses import dataclass
from collections.abc import Callable

from torch import nn

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.head import Head
from njtc_solve.data.rows import RowSource
from njtc_solve.maps.shortcuts import Shortcuts

__all__ = ["check_compatible"]

TARGETS = ("last", "any")


@dataclass
class _Other:
    """What maps are checked against, read lazily: a model's hash and head cost a pass over its weights."""

    where: str  # how errors name it
    n_layers: int
    d_model: int | None = None
    sha: Callable[[], str] | None = None
    head: Callable[[], Head] | None = None
    provenance: dict | None = None


def _other(maps: Shortcuts, source, model_sha256: str | None) -> _Other:
    if source is None:  # the maps' own record of the model they were fitted on
        return _Other("their model", int(maps.stats.get("n_layers", maps.target_layer)))
    if isinstance(source, RowSource):
        return _Other(str(source.path), source.n_layers, source.d_model, lambda: source.model_sha256, source.head,
                      source.provenance)
    if isinstance(source, nn.Module) and not isinstance(source, Shortcuts):
        from njtc_solve.core.decoder import Decoder
        from njtc_solve.core.models import model_sha256 as weights_sha256

        decoder = Decoder.of(source)
        head = decoder.head  # its width is the residual stream's (OPT's project_out is folded in)
        sha = (lambda: model_sha256) if model_sha256 is not None else (lambda: weights_sha256(source))
        return _Other("this model", decoder.n_blocks, head.d_model, sha, lambda: head)
    raise NJTCError(f"`source` must be a row source, a model or None, not {type(source).__name__}")


def _check_target(maps: Shortcuts, other: _Other, target: str) -> None:
    name, t, n = maps.name, maps.target_layer, other.n_layers
    if target == "last" and t != n:
        raise NJTCError(f"shortcuts {name} target layer {t}, not the last layer of {other.where} ({n}); maps read "
                        "through the head must target the last layer")
    if target == "any" and not 0 < t <= n:
        raise NJTCError(f"shortcuts {name} target layer {t}, not in 1..{n}")
    bad = sorted(l for l in maps.maps if not 0 <= l < t)
    if bad:
        raise NJTCError(f"shortcuts {name} have maps for layers {bad}, outside 0..{t - 1}")


def _check_width(maps: Shortcuts, other: _Other) -> None:
    for layer, m in maps.maps.items():
        if m.width is not None and m.width != other.d_model:
            raise NJTCError(f"shortcuts {maps.name} map layer {layer} to width {m.width}; {other.where}'s is "
                            f"{other.d_model}")


def check_compatible(maps: Shortcuts, source: RowSource | nn.Module | None = None, *, target: str = "last",
                     same_split: bool = False, head: Head | bool = True,
                     model_sha256: str | None = None) -> Head | None:
    """Refuse maps that do not belong to ``source``: another model, head, target layer, width or split.

    Parameters
    ----------
    maps : Shortcuts
    source : RowSource, model or None
        A row source, a Hugging Face causal LM, or ``None``: the maps' own record of their model.
    target : {"last", "any"}
        The maps must target the source's last layer, or any layer ``1..L``.
    same_split : bool
        The maps must have been fitted under the source's document split (``split_id``).
    head : bool or Head
        ``True``: check the maps' recorded head against the source's; a :class:`Head`: against
        that one; ``False``: no head check.
    model_sha256 : str, optional
        With a model as ``source``: the weights' hash the maps must have been fitted on (default:
        the model's); given, the head is compared by its description only (the model may be cast).

    Returns
    -------
    Head or None
        The source's head (checked), ``None`` when none was read.

    Raises
    ------
    NJTCError
        Naming the maps and the first disagreement (the identity belongs to every model).

    Examples
    --------
    >>> from njtc_solve import ActivationStore, fit_shortcuts
    >>> with ActivationStore("activations.h5") as store:
    ...     [jtc] = fit_shortcuts(store, method="jtc", progress=False)
    ...     head = check_compatible(jtc, store, same_split=True)
    ...     check_compatible(jtc.replace(target_layer=2, maps={1: jtc.maps[1]}), store, head=False)
    Traceback (most recent call last):
    ...
    njtc_solve.core.errors.NJTCError: shortcuts jtc target layer 2, not the last layer of activations.h5 (3); maps read through the head must target the last layer
    """
    if target not in TARGETS:
        raise NJTCError(f"`target` must be one of {', '.join(TARGETS)}, not {target!r}")
    other = _other(maps, source, model_sha256)
    if other.sha is not None and maps.method != "identity":
        theirs = other.sha()
        if maps.model_sha256 != theirs:
            raise NJTCError(f"shortcuts {maps.name} were fitted on another model (model_sha256 "
                            f"{maps.model_sha256[:12] or 'none'}…; {other.where} has {theirs[:12]}…)")
    _check_target(maps, other, target)
    if other.d_model is not None:
        _check_width(maps, other)
    if same_split:
        if other.provenance is None:
            raise NJTCError("`same_split=True` needs a row source to compare the split with")
        if maps.provenance.get("split_id") != other.provenance["split_id"]:
            raise NJTCError(f"shortcuts {maps.name} were fitted under another document split than {other.where}; "
                            "use the rows they were fitted on (the same store, or the same plan), so that their "
                            "validation rows stay unseen")
    if head is False or other.head is None:
        return None
    theirs = head if isinstance(head, Head) else other.head()
    if model_sha256 is not None and not isinstance(source, RowSource):  # a model cast since: its description
        if maps.head_description and maps.head_description != theirs.describe():
            raise NJTCError(f"shortcuts {maps.name} were fitted for another head "
                            f"({json.dumps(maps.head_description)}; this model's: {json.dumps(theirs.describe())})")
    else:
        maps.check_head(theirs)
    return theirs
