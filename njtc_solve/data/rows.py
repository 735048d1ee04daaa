"""The row-source protocol (:class:`RowSource`) that a fit, evaluation and training read rows from, and
the checks its two implementations share (:class:`RowSourceBase`): the activation store
(:class:`njtc_solve.data.store.ActivationStore`) and a live model (:class:`njtc_solve.data.live.LiveSource`).

Examples
--------
>>> from njtc_solve.data.store import ActivationStore
>>> with ActivationStore("activations.h5") as store:
...     isinstance(store, RowSource), store.check_layers([0, "3"]), store.source_layers
(True, [0, 3], [0, 1, 2])
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from njtc_solve.core.errors import NJTCError

if TYPE_CHECKING:
    from njtc_solve.core.head import Head

__all__ = ["DEFAULT_SKIP_POSITIONS", "FINAL_TOPK", "SPLITS", "TRAIN", "VALIDATION", "RowSource", "RowSourceBase",
           "split_code", "split_provenance"]

TRAIN, VALIDATION = 0, 1
SPLITS = {"train": TRAIN, "validation": VALIDATION, "val": VALIDATION}  # split names and their codes
# rows before this position are left out by default: position 0 (BOS or first token) is an attention sink
DEFAULT_SKIP_POSITIONS = 1
FINAL_TOPK = 10  # the model's own top-k kept per row (a store's `/final_topk`)


@runtime_checkable
class RowSource(Protocol):
    """What every consumer of rows reads: the surface an activation store and a live model share."""

    n_layers: int  # L: layers 0..L, L the last before the final norm
    d_model: int  # the width of a row
    path: str | Path  # where the rows come from: a store's file, live:MODEL for a model
    provenance: dict  # what identifies the rows and their split (split_provenance)
    model_sha256: str  # the weights' hash
    default_skip_positions: int  # rows at positions below this are left out by default
    layers: list[int]  # the layers whose rows the source can yield

    @property
    def source_layers(self) -> list[int]:
        """The layers a shortcut can start from (every layer held but the last)."""

    def head(self) -> Head:
        """The model's final norm and unembedding."""

    def check_layers(self, layers: Iterable[int]) -> list[int]:
        """``layers`` as a list of ints, once each is known to be held; else a one-line error."""

    def count(self, split: str | None = None, skip_positions: int = 0) -> int:
        """Rows of ``split`` (all rows for ``None``) at positions ``>= skip_positions``."""

    def evaluated_documents(self, skip_positions: int = 0) -> np.ndarray:
        """The documents of the validation rows at positions ``>= skip_positions``."""

    def iter_chunks(self, layers: Iterable[int], split: str | None = None, chunk_rows: int = 4096,
                    max_rows: int | None = None, shard: tuple[int, int] = (0, 1),
                    skip_positions: int = 0) -> Iterator[tuple[np.ndarray, dict]]:
        """Yield ``(row_indices, {layer: rows (n, d)})`` in row order."""


def split_code(split: str | None) -> int | None:
    """The code of a split name (``"train"``, ``"validation"`` or ``"val"``); ``None`` for all rows.

    >>> split_code("validation"), split_code(None)
    (1, None)
    """
    if split is None:
        return None
    if split not in SPLITS:
        raise NJTCError(f"unknown split {split!r}; use 'train' or 'validation'")
    return SPLITS[split]


class RowSourceBase:
    """The checks every :class:`RowSource` shares.

    A subclass sets ``n_layers``, ``layers``, ``path`` and ``_held_by`` (what errors call it), and
    provides ``selection(split, skip_positions)``, the boolean mask of the rows :meth:`count` counts.
    """

    default_skip_positions = DEFAULT_SKIP_POSITIONS
    _held_by = "source"

    @property
    def source_layers(self) -> list[int]:
        """The layers a shortcut can start from (every layer held but the last)."""
        return [l for l in self.layers if l < self.n_layers]

    def check_layers(self, layers: Iterable[int]) -> list[int]:
        """Validate layer indices against the layers held; returns them as a list of ints."""
        layers = [int(l) for l in layers]
        bad = [l for l in layers if not 0 <= l <= self.n_layers]
        if bad:
            raise NJTCError(f"layer {bad[0]} is not in the {self._held_by} (layers 0..{self.n_layers})")
        absent = [l for l in layers if l not in self.layers]
        if absent:
            raise NJTCError(f"layer {absent[0]} was not extracted into {self.path} (it holds layers "
                            f"{','.join(map(str, self.layers))})")
        return layers

    def count(self, split: str | None = None, skip_positions: int = 0) -> int:
        """Rows of ``split`` (all rows for ``None``) at positions ``>= skip_positions``."""
        return int(self.selection(split, skip_positions).sum())


def split_provenance(attrs: dict, validation_documents, where: str) -> dict:
    """What identifies a set of rows and their split, for a store or a live model alike.

    ``attrs`` holds the extraction's settings. ``split_by`` is ``"document"`` (with
    ``validation_documents``), or ``"sequence"`` for a format-1 store. ``split_id`` hashes all but
    ``where``, so a live run and a store extracted with the same settings share it.
    """
    a = attrs
    out = {"store": where, "corpus_sha256": a.get("corpus_sha256"), "seed": a.get("seed"),
           "val_fraction": a.get("val_fraction"), "seq_len": a.get("seq_len"), "positions": a.get("positions"),
           "max_tokens": a.get("max_tokens"), "bos": a.get("bos", False)}
    if validation_documents is not None:
        out.update(split_by="document", validation_documents=[int(d) for d in validation_documents])
    else:
        out["split_by"] = "sequence"
    key = json.dumps({k: out[k] for k in sorted(out) if k not in ("store", "bos")}, default=str)
    out["split_id"] = hashlib.sha256(key.encode()).hexdigest()[:16]
    return out
