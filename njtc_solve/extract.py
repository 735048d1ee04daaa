"""Stage 1: run a causal LM over a corpus and cache every layer's residual stream to HDF5.

Command line::

    python -m njtc_solve.extract [--model M] [--corpus C] [--out activations.h5] ...

Layer 0 is the input to the first block (the embedding output), layer ``l`` the output of
block ``l`` and layer ``L`` the last block's output *before* the final norm. The model's
head and its own top-1 prediction per row are stored too, so later stages never need the
model. Output is written to ``OUT.partial`` and renamed when complete; an interrupted run
continues with ``--resume``.

The plan (which sequences, split, positions) is :mod:`njtc_solve.plan`'s, the file
:class:`njtc_solve.store.StoreWriter`'s; this module runs the model between them.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import torch
from tqdm.auto import tqdm

from .architectures import resolve_parts
from .capture import forward_batches, head_check_tolerance
from .corpus import corpus_sha256, load_corpus
from .errors import NJTCError, run_cli, temporary_path
from .head import Head
from .models import add_model_arguments, check_device, load_model_from_args, model_sha256
from .outputs import check_not_inputs, command_inputs
from .plan import PLAN_DEFAULTS
from .plan import plan_extraction as _plan_extraction
from .store import STORE_DTYPES, VALIDATION, StoreWriter
from .store import check_output as _check_output
from .store import stored_layers as _stored_layers

if TYPE_CHECKING:
    from .plan import ExtractionPlan

__all__ = ["PLAN_DEFAULTS", "add_plan_arguments", "extract_activations", "head_check_tolerance", "main",
           "parse_layers", "plan_settings"]

# moved: the old names still work, with a DeprecationWarning
_MOVED = {"ExtractionPlan": "plan", "bos_token": "plan", "plan_extraction": "plan", "bytes_per_token": "store",
          "stored_layers": "store"}


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"njtc_solve.extract.{name} moved to njtc_solve.{_MOVED[name]}.{name}", DeprecationWarning,
                      stacklevel=2)
        return getattr(import_module(f".{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _sample_logits(model, plan: ExtractionPlan, rows: int = 64) -> tuple[int, torch.Tensor]:
    """``(0, logits)``: the model's logits at the first rows, for a run that had no batch left to write."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(plan.token_ids[:1], device=device)).logits[0]
    positions = plan.row_positions(slice(0, 1))[:rows]
    return 0, logits[torch.as_tensor(positions)].float().cpu()


def _write_rows(model, plan: ExtractionPlan, writer: StoreWriter, batch_size: int, progress: bool) -> None:
    """Run the model over the plan's batches not yet written and hand their rows to ``writer``."""
    first_batch = writer.rows_written // (batch_size * plan.rows_per_sequence)
    seq_len = plan.seq_len
    with tqdm(leave=False, total=len(plan.sequence) * seq_len, initial=first_batch * batch_size * seq_len,
              unit="tok", unit_scale=True, desc="extract", disable=not progress) as bar:
        for batch in forward_batches(model, plan, batch_size, first_batch):
            writer.write(batch.rows, batch.hidden, batch.tokens, batch.logits)
            bar.update(batch.tokens.numel() if plan.position is None else len(batch.tokens) * seq_len)
    if not writer.head_checked:  # nothing was left to write (a resumed run): check the rows written
        writer.check_head(*_sample_logits(model, plan))


def extract_activations(model, tokenizer, documents, out, *, model_name: str = "", corpus_name: str = "",
                        seq_len: int = 128, positions: str = "all", max_tokens: int | None = None,
                        val_fraction: float = 0.25, seed: int = 0, dtype: str = "float32", batch_size: int = 8,
                        resume: bool = False, overwrite: bool = False, progress: bool = True,
                        corpus_sha: str | None = None, weights_sha: str | None = None,
                        shard: tuple[int, int] = (0, 1), bos: str = "auto", layers: list[int] | None = None) -> Path:
    """Cache a model's residual stream at every layer, its head and its own predictions.

    Parameters
    ----------
    model, tokenizer
        A Hugging Face causal LM (architecture in :data:`njtc_solve.architectures.ARCHITECTURES`)
        and its tokenizer.
    documents : list of str
        The corpus (see :func:`njtc_solve.corpus.load_corpus`).
    out : path
        The HDF5 store to write (written as ``out.partial``, renamed when complete), under its
        output lock (see :class:`~njtc_solve.store.StoreWriter`).
    model_name, corpus_name : str
        Recorded in the store.
    seq_len, positions, max_tokens, val_fraction, seed, bos
        The plan: see :func:`njtc_solve.plan.plan_extraction` (the split is by document;
        ``bos`` is ``auto``, ``always`` or ``never``).
    dtype : {"float32", "float16", "bfloat16"}
        Storage type of the activations: 4, 2 or 2 bytes per value (see
        :data:`~njtc_solve.store.STORE_DTYPES`); float16 refuses values beyond its range,
        bfloat16 keeps float32's range with 8 bits of mantissa. Readers upcast to float32.
    batch_size : int
        Sequences per forward pass (part of the resume contract).
    resume, overwrite : bool
        Continue ``out.partial`` from ``rows_written`` (start afresh when there is none);
        replace an existing output.
    progress : bool
        Show progress bars.
    corpus_sha, weights_sha : str, optional
        The corpus's and the model's sha256 when already known (else computed).
    shard : (rank, world)
        Extract only the ``rank``-th contiguous block of the sequences (scale-out; see
        :func:`~njtc_solve.store.combine_shards`).
    layers : list of int, optional
        Source layers to store (default: all, 0..L-1); the target layer ``L`` is always kept.

    Returns
    -------
    Path
        The completed store.

    Examples
    --------
    >>> out = extract_activations(model, tokenizer, documents, "small.h5", seq_len=32, max_tokens=512,
    ...                           progress=False)
    >>> out.name
    'small.h5'
    """
    out = Path(out)
    StoreWriter.check_settings(dtype=dtype, batch_size=batch_size)
    with StoreWriter.reserve(out, resume=resume, overwrite=overwrite):
        head = Head.from_model(model)
        n_layers = len(resolve_parts(model)[1])
        stored = _stored_layers(layers, n_layers)
        plan = _plan_extraction(tokenizer, documents, seq_len=seq_len, positions=positions, max_tokens=max_tokens,
                                val_fraction=val_fraction, seed=seed, bos=bos)
        if shard[1] > 1:
            plan = plan.block(*shard)
            if len(plan.sequence) == 0:
                raise NJTCError(f"process {shard[0]} of {shard[1]} has no sequences; use fewer processes")
        provenance = {"model": model_name, "architecture": model.config.model_type, "n_layers": n_layers,
                      "corpus": corpus_name, "corpus_sha256": corpus_sha or corpus_sha256(documents),
                      "model_sha256": weights_sha or model_sha256(model, progress), "seed": seed,
                      "val_fraction": float(val_fraction), "max_tokens": -1 if max_tokens is None else int(max_tokens),
                      "n_documents": len(documents)}
        with StoreWriter(out, plan, head, provenance=provenance, layers=stored, dtype=dtype, batch_size=batch_size,
                         shard=shard, model_dtype=next(model.parameters()).dtype, resume=resume,
                         overwrite=overwrite) as writer:
            _write_rows(model, plan, writer, batch_size, progress)
            return writer.finish()


# -- transitional: for `main` below, until the command layer (njtc_solve/cli) replaces it -----------
output_lock = StoreWriter.lock  # the store's lock, which extract_activations' own hold then nests in


def check_output(out, resume: bool = False, overwrite: bool = False) -> None:
    """The old form of :func:`njtc_solve.store.check_output` (``resume`` and ``overwrite`` by position)."""
    _check_output(out, resume=resume, overwrite=overwrite)


def add_plan_arguments(p: argparse.ArgumentParser, inherit: bool = False) -> None:
    """The corpus and plan arguments of every command that runs a model over a corpus.

    With ``inherit`` the defaults are ``None``: the command takes them from a shortcut's
    provenance (see :func:`plan_settings`).
    """
    default = (lambda key: None) if inherit else PLAN_DEFAULTS.get
    p.add_argument("--corpus", default=default("corpus"),
                   help="pydoc_data.topics (default), a .txt file (a document per line), a folder of .txt files or "
                   "a .jsonl file")
    p.add_argument("--text-field", default=default("text_field"), help="text field of each .jsonl record (default: text)")
    p.add_argument("--seq-len", type=int, default=default("seq_len"), help="tokens per sequence (default: 128)")
    p.add_argument("--positions", choices=["all", "one-per-sequence"], default=default("positions"),
                   help="every position, or one random position per sequence (JTC protocol)")
    p.add_argument("--max-tokens", type=int, help="bound on the rows (tokens) read from the corpus")
    p.add_argument("--val-fraction", type=float, default=default("val_fraction"),
                   help="fraction of the tokens held out for validation, as whole documents (default: 0.25)")
    p.add_argument("--seed", type=int, default=default("seed"),
                   help="seed of the document split, sequence sample and positions")
    p.add_argument("--bos", choices=["auto", "always", "never"], default=default("bos"),
                   help="start each sequence with the tokenizer's BOS token: auto (default: where the tokenizer "
                   "adds one itself), always or never")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")


def plan_settings(args, provenance: dict | None = None) -> dict:
    """The plan's keyword arguments from parsed arguments; unset ones from ``provenance``.

    ``provenance`` is a shortcut's (:attr:`Shortcuts.provenance`): evaluating a live model
    with the plan its shortcut was fitted with holds out exactly the documents it never saw.
    """
    inherited = {}
    if provenance:
        inherited = {"seq_len": provenance.get("seq_len"), "positions": provenance.get("positions"),
                     "val_fraction": provenance.get("val_fraction"), "seed": provenance.get("seed"),
                     "max_tokens": None if provenance.get("max_tokens") in (None, -1) else provenance["max_tokens"],
                     "bos": None if "bos" not in provenance else ("always" if provenance["bos"] else "never")}
    settings = {}
    for key in ("seq_len", "positions", "max_tokens", "val_fraction", "seed", "bos"):
        value = getattr(args, key)
        if value is None:
            value = inherited.get(key)
        settings[key] = PLAN_DEFAULTS[key] if value is None else value
    if settings["max_tokens"] is not None and settings["max_tokens"] <= 0:
        raise NJTCError("--max-tokens must be positive")
    if settings["seed"] < 0:
        raise NJTCError(f"--seed must be 0 or more, not {settings['seed']}")
    if settings["seq_len"] < 2:  # what plan_extraction refuses, here before a model loads
        raise NJTCError(f"--seq-len must be at least 2, not {settings['seq_len']}")
    if not 0 <= settings["val_fraction"] < 1:
        raise NJTCError(f"--val-fraction must be in [0, 1), not {settings['val_fraction']}")
    if getattr(args, "batch_size", 1) < 1:
        raise NJTCError("--batch-size must be positive")
    return settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m njtc_solve.extract", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plan_arguments(p)
    p.add_argument("--out", default="activations.h5", help="output store (default: activations.h5)")
    p.add_argument("--store-dtype", "--dtype", dest="dtype", choices=list(STORE_DTYPES), default="float32",
                   help="storage type of the activations: float32 (default), float16 (half the disk; refuses "
                   "activations beyond its range) or bfloat16 (half the disk, float32's range, 8-bit mantissa); "
                   "a store takes (stored layers) x d x 4 bytes per token in float32, x 2 in 16 bits: 71 kB "
                   "per token for SmolLM2-135M's 31 layers at d=576, 541 kB for Llama-2-7B's 33 at d=4096 (kB = 1000 bytes)")
    p.add_argument("--layers", help="source layers to store: all (default), 3, 1,5,9 or 0-29; the last layer "
                   "(the target) is always stored")
    p.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from rows_written")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(p)
    return p


def parse_layers(text: str | None):
    """Parse ``"all"``, ``"3"``, ``"1,5,9"`` or ``"0-29"`` into source layer indices."""
    if text is None or text == "all":
        return None
    layers = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                layers.extend(range(int(a), int(b) + 1))
            else:
                layers.append(int(part))
    except ValueError as err:
        raise NJTCError(f"cannot parse --layers {text!r}; use e.g. 3 or 1,5,9 or 0-29") from err
    return layers


def main(argv=None) -> int:
    """Command-line entry point of ``python -m njtc_solve.extract`` (also under torchrun)."""
    from .distributed import Communicator
    from .store import combine_shards, shard_path

    args = _parser().parse_args(argv)
    plan_settings(args)  # a bad plan is refused before the corpus and the model load
    if args.dtype not in STORE_DTYPES:
        raise NJTCError(f"--store-dtype must be one of {', '.join(STORE_DTYPES)}")
    check_device(args.device)
    comm = Communicator.from_environment(args.device)
    try:
        start = time.perf_counter()
        device = comm.device if comm is not None else args.device
        shard = (0, 1) if comm is None else (comm.rank, comm.world_size)
        out = Path(args.out) if comm is None else shard_path(args.out, *shard)
        ok = False
        try:  # every process votes on the way out, so none waits for a failed peer
            check_not_inputs([("--out", args.out), ("--out", None if comm is None else out)],
                             command_inputs(args, "corpus", "model"))
            if comm is not None and Path(args.out).exists() and not args.overwrite:
                raise NJTCError(f"{args.out} exists; pass --overwrite to replace it")
            if not out.parent.is_dir():
                raise NJTCError(f"cannot write {out}: folder {out.parent} does not exist")
            with output_lock(out):  # before any work: a second run to the same output refuses
                check_output(out, args.resume, args.overwrite)  # before the model loads
                if args.resume and not temporary_path(out).exists():
                    print(f"note: nothing to resume ({temporary_path(out)} does not exist); starting afresh",
                          file=sys.stderr)
                corpus_name, documents = load_corpus(args.corpus, args.text_field)
                model, tokenizer, model_name = load_model_from_args(args, device, progress=not args.no_progress)
                out = extract_activations(
                    model, tokenizer, documents, out, model_name=model_name, corpus_name=corpus_name,
                    seq_len=args.seq_len, positions=args.positions, max_tokens=args.max_tokens,
                    val_fraction=args.val_fraction, seed=args.seed, dtype=args.dtype,
                    batch_size=args.batch_size, resume=args.resume, overwrite=args.overwrite,
                    progress=not args.no_progress and shard[0] == 0, shard=shard, bos=args.bos,
                    layers=parse_layers(args.layers),
                )
            ok = True
        finally:
            if comm is not None and not comm.vote(ok) and ok:
                raise NJTCError("another process failed; the combined store was not written")
        if comm is not None:
            if comm.rank != 0:
                return 0
            with output_lock(Path(args.out)):  # a second run to the same output refuses, as for one process
                out = combine_shards(args.out, [shard_path(args.out, r, shard[1]) for r in range(shard[1])])
        with h5py.File(out, "r") as f:
            a = f.attrs
            print(f"wrote {out}: {a['n_rows']} rows x {len(a.get('layers', range(a['n_layers'] + 1)))} layers "
                  f"x d={a['d_model']} "
                  f"({int((f['split'][...] == VALIDATION).sum())} validation rows from "
                  f"{len(f['validation_documents'])} of {a['n_documents']} documents; "
                  f"{'a BOS token' if a['bos'] else 'no BOS token'} at position 0); head check: "
                  f"relative error {a['head_check_rel_err']:.2e}, top-1 agreement "
                  f"{a['head_check_top1_agreement']:.3f}; {time.perf_counter() - start:.1f}s")
        return 0
    finally:
        if comm is not None:
            comm.close()


if __name__ == "__main__":
    raise SystemExit(run_cli(main, interrupted="the partial store is kept: resume with --resume"))
