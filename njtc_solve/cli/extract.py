"""``python -m njtc_solve.extract``: a model's residual stream over a corpus into an HDF5 store
(also under torchrun, one shard per process, combined at the end)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from njtc_solve.data import extract as library
from njtc_solve.core.errors import NJTCError
from njtc_solve.core.outputs import output_lock, temporary_path
from njtc_solve.data.store_writer import StoreWriter
from njtc_solve.cli import command, entry_point, prog
from njtc_solve.cli.arguments import add_model_arguments, add_plan_arguments, command_inputs, load_model_from_args, parse_layers, plan_settings

__all__ = ["build_parser", "main", "run"]

INTERRUPTED = "the partial store is kept: resume with --resume"


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    from njtc_solve.data.store import STORE_DTYPES

    p = argparse.ArgumentParser(prog=prog("extract"), description=library.__doc__,
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


@command(build_parser)
def main(args) -> int:
    """Command-line entry point of ``python -m njtc_solve.extract`` (also under torchrun)."""
    import h5py

    from njtc_solve.data.corpus import load_corpus
    from njtc_solve.core.distributed import Communicator
    from njtc_solve.core.models import check_device
    from njtc_solve.core.outputs import check_not_inputs
    from njtc_solve.data.rows import VALIDATION
    from njtc_solve.data.shards import combine_shards, shard_path

    settings = plan_settings(args)  # a bad plan is refused before the corpus and the model load
    StoreWriter.check_settings(dtype=args.dtype, batch_size=args.batch_size)
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
            # the output checked and locked before any work: a second run to the same output refuses
            with StoreWriter.reserve(out, resume=args.resume, overwrite=args.overwrite):
                if args.resume and not temporary_path(out).exists():
                    print(f"note: nothing to resume ({temporary_path(out)} does not exist); starting afresh",
                          file=sys.stderr)
                corpus_name, documents = load_corpus(args.corpus, text_field=args.text_field)
                model, tokenizer, model_name = load_model_from_args(args, device, progress=not args.no_progress)
                out = library.extract_activations(
                    model, tokenizer, documents, out, model_name=model_name, corpus_name=corpus_name, **settings,
                    dtype=args.dtype, batch_size=args.batch_size, resume=args.resume, overwrite=args.overwrite,
                    progress=not args.no_progress and shard[0] == 0, shard=shard, layers=parse_layers(args.layers))
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


run = entry_point(main, INTERRUPTED)

if __name__ == "__main__":
    raise SystemExit(run())
