"""The extraction plan: corpus → documents → split → sequences, the same for every reader of a model.

Extraction, the live source and pruning all run a model over an :class:`ExtractionPlan`, so rows,
positions and the split by document are the same on every path. Planning needs only the tokenizer.

Examples
--------
>>> plan = plan_extraction(tokenizer, documents, seq_len=32, max_tokens=512)
>>> plan.n_rows, plan.token_ids.shape, sorted(set(plan.split.tolist()))
(512, (16, 32), [0, 1])
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.params import Check, Interval, Options, check_spec
from njtc_solve.data.corpus import DEFAULT_CORPUS
from njtc_solve.data.rows import DEFAULT_SKIP_POSITIONS, TRAIN, VALIDATION

__all__ = ["PLAN_DEFAULTS", "POSITIONS", "ExtractionPlan", "PlanSpec", "bos_token", "check_plan_settings",
           "plan_extraction"]

POSITIONS = ("all", "one-per-sequence")  # every position of a sequence, or one random position
_BOS = ("auto", "always", "never")


@dataclass(frozen=True)
class PlanSpec:
    """The settings of a plan (a model run over a corpus), checked when made, before anything loads.

    The one place the plan's defaults are spelled out.

    Parameters
    ----------
    corpus, text_field : str
        :func:`njtc_solve.data.corpus.load_corpus`'s ``spec`` and ``text_field``.
    seq_len, positions, max_tokens, val_fraction, seed, bos
        :func:`plan_extraction`'s.
    batch_size : int
        Sequences per forward pass.

    Examples
    --------
    >>> PlanSpec(seq_len=32).rows_per_sequence, PlanSpec(positions="one-per-sequence").rows_per_sequence
    (32, 1)
    >>> PlanSpec(seq_len=1)
    Traceback (most recent call last):
      ...
    njtc_solve.core.errors.NJTCError: `seq_len` must be at least 2, not 1
    """

    corpus: str = DEFAULT_CORPUS
    text_field: str = "text"
    seq_len: int = 128
    positions: str = "all"
    max_tokens: int | None = None
    val_fraction: float = 0.25
    seed: int = 0
    bos: str = "auto"
    batch_size: int = 8

    constraints: ClassVar[dict] = {
        "corpus": [Check(lambda v: isinstance(v, (str, os.PathLike)) and str(v) != "", says="a corpus name or path",
                         invalid="")],
        "text_field": [Check(lambda v: isinstance(v, str) and v != "", says="a field name", invalid="")],
        "seq_len": [Interval(int, 2, None)],
        "positions": [Options(POSITIONS, says="'all' or 'one-per-sequence'")],
        "max_tokens": [None, Interval(int, 1, None, says="positive", show_value=False)],
        "val_fraction": [Interval(float, 0, 1, closed="left", says="in [0, 1)")],
        "seed": [Interval(int, 0, None, says="0 or more")],
        "bos": [Options(_BOS, says="auto, always or never")],
        "batch_size": [Interval(int, 1, None, says="positive", show_value=False)],
    }

    def __post_init__(self):
        check_spec(self)
        if self.max_tokens is not None and self.max_tokens < self.rows_per_sequence:
            raise NJTCError(f"`max_tokens` {self.max_tokens} is below one sequence ({self.rows_per_sequence} rows)")

    @property
    def rows_per_sequence(self) -> int:
        """Rows each sequence gives: ``seq_len``, or 1 with one position per sequence."""
        return self.seq_len if self.positions == "all" else 1


# the defaults of every command that runs a model over a corpus (see plan_extraction)
PLAN_DEFAULTS = asdict(PlanSpec())


@dataclass
class ExtractionPlan:
    """Which sequences are read, in which row order (training, then validation), with which split and positions.

    It follows from the corpus, the tokenizer and the seed alone, so a resumed or sharded run sees the same plan.
    """

    token_ids: np.ndarray  # (n_sequences, seq_len) int64, in row order
    sequence: np.ndarray  # (n_sequences,) index of each sequence among the windows of the corpus
    split: np.ndarray  # (n_sequences,) uint8
    position: np.ndarray | None  # (n_sequences,) chosen position, one-per-sequence only
    seq_len: int
    document: np.ndarray  # (n_sequences, seq_len) document of each token (a BOS takes the next token's)
    validation_documents: np.ndarray  # every document assigned to validation, sorted
    bos: bool = False  # each sequence starts with the tokenizer's BOS token

    @property
    def rows_per_sequence(self) -> int:
        """Rows each sequence gives: all its positions, or its one chosen position."""
        return self.seq_len if self.position is None else 1

    @property
    def n_rows(self) -> int:
        """Rows of the whole plan."""
        return len(self.sequence) * self.rows_per_sequence

    def block(self, rank: int, world: int) -> ExtractionPlan:
        """The ``rank``-th of ``world`` contiguous blocks of sequences (one process's share)."""
        n = len(self.sequence)
        return self.sequences(slice(rank * n // world, (rank + 1) * n // world))

    def sequences(self, part) -> ExtractionPlan:
        """The plan of the sequences ``part`` (a slice or an index array of the row-ordered sequences)."""
        return ExtractionPlan(self.token_ids[part], self.sequence[part], self.split[part],
                              None if self.position is None else self.position[part], self.seq_len,
                              self.document[part], self.validation_documents, self.bos)

    def row_positions(self, seqs: slice) -> np.ndarray:
        """Positions of the rows of sequences ``seqs`` (a slice of row-ordered sequences)."""
        n = len(self.sequence[seqs])
        if self.position is None:
            return np.tile(np.arange(self.seq_len), n)
        return self.position[seqs]

    def spread_order(self, split: int, seed: int = 0) -> np.ndarray:
        """Indices of the ``split``'s sequences in a seeded order that visits the documents in turn.

        It takes one sequence of every document (the one holding most of its tokens) before a
        second of any, so its first ``n`` sequences come from ``min(n, documents)`` documents.
        """
        index = np.flatnonzero(self.split == split)
        rng = np.random.default_rng([seed, int(split)])
        index = index[rng.permutation(len(index))]
        owner = [int(np.bincount(row - row.min()).argmax() + row.min()) for row in self.document[index]]
        turn, seen = np.empty(len(index), dtype=np.int64), {}
        for i, doc in enumerate(owner):
            turn[i] = seen.get(doc, 0)
            seen[doc] = turn[i] + 1
        return index[np.argsort(turn, kind="stable")]

    def row_documents(self) -> np.ndarray:
        """The document of every row, in row order."""
        if self.position is None:
            return self.document.reshape(-1)
        return self.document[np.arange(len(self.sequence)), self.position]


def bos_token(tokenizer, bos: str = "auto") -> int | None:
    """The BOS token id to start every sequence with, or ``None``.

    ``auto`` adds it where the tokenizer itself would, ``always`` wherever it has one, ``never`` not at all.
    """
    if bos not in _BOS:
        raise NJTCError(f"`bos` must be auto, always or never, not {bos!r}")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos == "never":
        return None
    if bos == "always":
        if bos_id is None:
            raise NJTCError("`bos` always: the tokenizer has no BOS token")
        return bos_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos_id if bos_id is not None and list(ids[:1]) == [bos_id] else None


def check_plan_settings(*, seq_len: int = PlanSpec.seq_len, positions: str = PlanSpec.positions,
                        max_tokens: int | None = PlanSpec.max_tokens, val_fraction: float = PlanSpec.val_fraction,
                        seed: int = PlanSpec.seed, bos: str = PlanSpec.bos) -> None:
    """Refuse plan settings that no corpus can satisfy, before anything is loaded (a :class:`PlanSpec`).

    Raises
    ------
    NJTCError
        Naming the setting in backticks, e.g. "`seq_len` must be at least 2, not 1".
    """
    PlanSpec(seq_len=seq_len, positions=positions, max_tokens=max_tokens, val_fraction=val_fraction, seed=seed,
             bos=bos)


def _split_documents(lengths: np.ndarray, val_fraction: float, rng) -> np.ndarray:
    """Which documents are validation: seeded whole documents holding ``val_fraction`` of the tokens."""
    is_val = np.zeros(len(lengths), dtype=bool)
    if val_fraction == 0:
        return is_val
    if len(lengths) < 2:
        raise NJTCError("the split is by document and the corpus holds one; use more documents "
                        "(e.g. one per line of a .txt) or `val_fraction` 0")
    order = rng.permutation(len(lengths))
    cumulative = np.cumsum(lengths[order])
    n_val = int(np.abs(cumulative - val_fraction * cumulative[-1]).argmin()) + 1  # nearest the fraction
    is_val[order[:min(n_val, len(lengths) - 1)]] = True
    return is_val


def _tokenize(tokenizer, documents) -> list:
    """Token ids of each document, without special tokens."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "sequence longer than the model's maximum"
    try:
        return tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)


def _windows(encoded, separator: list, lengths: np.ndarray, docs: np.ndarray, body: int):
    """``(tokens, owners)``: the documents ``docs`` joined by ``separator`` in windows of ``body`` tokens."""
    stream = np.fromiter((t for d in docs for t in list(encoded[d]) + separator), dtype=np.int64)
    owner = np.repeat(docs, lengths[docs])
    n_windows = len(stream) // body
    return (stream[: n_windows * body].reshape(n_windows, body),
            owner[: n_windows * body].reshape(n_windows, body))


def _sequences_taken(n_train: int, n_val: int, *, seq_len: int, max_tokens: int | None, val_fraction: float,
                     rows_per_sequence: int, n_tokens: int) -> tuple[int, int]:
    """How many training and validation windows the plan keeps (all, or ``max_tokens``' share)."""
    if n_train + n_val == 0:
        raise NJTCError(f"the corpus has {n_tokens} tokens, fewer than one sequence of {seq_len}")
    if val_fraction > 0 and n_val == 0:
        raise NJTCError(f"the validation documents hold fewer tokens than one sequence of {seq_len}; "
                        "lower `seq_len` or raise `val_fraction`")
    if n_train == 0:
        raise NJTCError(f"the training documents hold fewer tokens than one sequence of {seq_len}; "
                        "lower `seq_len` or `val_fraction`, or use more documents")
    if max_tokens is None:
        return n_train, n_val
    total = max_tokens // rows_per_sequence
    take_val = min(n_val, max(1, int(round(val_fraction * total)))) if val_fraction > 0 else 0
    take_train = min(n_train, total - take_val)
    if take_train == 0:
        raise NJTCError(f"`max_tokens` {max_tokens} leaves no training sequence beside the validation one; "
                        "raise it")
    return take_train, take_val


def plan_extraction(tokenizer, documents, *, seq_len: int = PlanSpec.seq_len, positions: str = PlanSpec.positions,
                    max_tokens: int | None = PlanSpec.max_tokens, val_fraction: float = PlanSpec.val_fraction,
                    seed: int = PlanSpec.seed, bos: str = PlanSpec.bos) -> ExtractionPlan:
    """Tokenise documents into sequences and fix the split and sampled positions.

    Whole documents are split first, so none is on both sides; each split's documents are joined
    with the end-of-text token and cut into non-overlapping windows, after a BOS token if any.

    Parameters
    ----------
    tokenizer
        A Hugging Face tokenizer.
    documents : list of str
        The corpus (:func:`njtc_solve.data.corpus.load_corpus`).
    seq_len : int
        Tokens per sequence (at least 2).
    positions : {"all", "one-per-sequence"}
        Every position of a sequence is a row, or one seeded random position per sequence
        (never the BOS, nor before :data:`~njtc_solve.data.rows.DEFAULT_SKIP_POSITIONS`).
    max_tokens : int, optional
        Bound on the rows: a seeded subset of whole sequences of each split, in proportion.
    val_fraction : float
        Share of the tokens held out for validation, as whole documents, in [0, 1).
    seed : int
        Seed of the split, the sequence sample and the positions.
    bos : {"auto", "always", "never"}
        Start each sequence with the tokenizer's BOS token (see :func:`bos_token`).

    Returns
    -------
    ExtractionPlan
        Training sequences first, then validation ones.
    """
    check_plan_settings(seq_len=seq_len, positions=positions, max_tokens=max_tokens, val_fraction=val_fraction,
                        seed=seed, bos=bos)
    bos_id = bos_token(tokenizer, bos)
    encoded = _tokenize(tokenizer, documents)
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    lengths = np.array([len(ids) + len(separator) for ids in encoded])
    rng = np.random.default_rng(seed)
    is_val_doc = _split_documents(lengths, val_fraction, rng)
    body = seq_len - (bos_id is not None)
    windows = {code: _windows(encoded, separator, lengths, np.flatnonzero(is_val_doc == wanted), body)
               for code, wanted in ((TRAIN, False), (VALIDATION, True))}
    n_train, n_val = len(windows[TRAIN][0]), len(windows[VALIDATION][0])
    take_train, take_val = _sequences_taken(
        n_train, n_val, seq_len=seq_len, max_tokens=max_tokens, val_fraction=val_fraction,
        rows_per_sequence=seq_len if positions == "all" else 1, n_tokens=int(lengths.sum()))
    chosen = {TRAIN: np.sort(rng.choice(n_train, size=take_train, replace=False)),
              VALIDATION: np.sort(rng.choice(n_val, size=take_val, replace=False))}
    tokens = np.concatenate([windows[c][0][chosen[c]] for c in (TRAIN, VALIDATION)])
    document = np.concatenate([windows[c][1][chosen[c]] for c in (TRAIN, VALIDATION)])
    if bos_id is not None:
        tokens = np.concatenate([np.full((len(tokens), 1), bos_id, np.int64), tokens], axis=1)
        document = np.concatenate([document[:, :1], document], axis=1)
    sequence = np.concatenate([chosen[TRAIN], n_train + chosen[VALIDATION]])
    split = np.repeat(np.array([TRAIN, VALIDATION], np.uint8), [take_train, take_val])
    position = None
    if positions == "one-per-sequence":  # never the BOS row, nor rows that fits skip by default
        position = rng.integers(max(int(bos_id is not None), DEFAULT_SKIP_POSITIONS), seq_len, size=len(sequence))
    return ExtractionPlan(tokens, sequence, split, position, seq_len, document,
                          np.flatnonzero(is_val_doc), bos_id is not None)
