"""``python -m njtc_solve.evaluate``: held-out metrics of shortcut files and tuned-lens folders,
written as a report (tables, figures, CSV and JSON)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from njtc_solve.evaluation import evaluate as library
from njtc_solve.core.errors import NJTCError
from njtc_solve.core.outputs import temporary_path
from njtc_solve.cli import command, entry_point, flags_of, prog, translate
from njtc_solve.cli.arguments import (add_model_arguments, add_plan_arguments, command_inputs, jacobian_lens_inputs,
                                      parse_layers, plan_settings, rows_from_args)

__all__ = ["build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    p = argparse.ArgumentParser(prog=prog("evaluate"), description=library.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="activation store (default: activations.h5, unless --model is given)")
    add_model_arguments(p)  # --model: read the rows from its forward pass instead of a store
    live = p.add_argument_group("live evaluation (with --model): the corpus and plan; unset values come from the "
                                "first shortcut's provenance, so its held-out documents are evaluated")
    add_plan_arguments(live, inherit=True)
    p.add_argument("--shortcuts", nargs="*", default=None,
                   help="shortcut files (default: shortcuts.safetensors when present); identity is always included")
    p.add_argument("--tuned-lens", nargs="+", default=[], metavar="DIR",
                   help="tuned-lens folders (config.json, params.pt) evaluated beside the shortcuts, as tuned-lens "
                   "(several: each as tuned-lens-FOLDER)")
    p.add_argument("--jacobian-lens", nargs="+", default=[], metavar="DIR",
                   help="Jacobian-lens folders or .pt files (TransformerLens's JacobianLens: lens.pt) evaluated "
                   "beside the shortcuts, as jacobian-lens (several: each as jacobian-lens-FOLDER)")
    p.add_argument("--layers", help="source layers: all (default), 3, 1,5,9 or 0-29")
    p.add_argument("--out", default="report", help="output folder (default: report)")
    p.add_argument("--max-rows", type=int, help="evaluate on at most this many validation rows")
    p.add_argument("--skip-rows", type=int, help="with --model, maps to an intermediate layer: held-out tokens the "
                   "skip scores run the model over (default: --max-rows, else 8192)")
    p.add_argument("--chunk-rows", type=int, default=256, help="rows per chunk (default: 256)")
    p.add_argument("--skip-positions", type=int, help="leave out rows at positions below this "
                   "(default: 1, the BOS row, or the first token's attention sink where there is no BOS)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="evaluate even if a shortcut was fitted on another split of this store's corpus")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_arguments(args, files: list[str]) -> Path:
    """Every check that reads no row: the numbers, and the report folder against the inputs."""
    from njtc_solve.maps.tuned_lens import TUNED_LENS_FILES
    from njtc_solve.core.outputs import check_folder_output, check_not_inputs
    from njtc_solve.evaluation.report import PAIRWISE_KIND, REPORT_FILES, REPORT_KIND

    library.EvaluateSpec(layers=parse_layers(args.layers), max_rows=args.max_rows, skip_rows=args.skip_rows,
                         chunk_rows=args.chunk_rows, device=args.device, skip_positions=args.skip_positions)
    out = Path(args.out)
    lens_files = [("--tuned-lens", Path(d) / name) for d in args.tuned_lens for name in TUNED_LENS_FILES]
    lens_files += [pair for path in args.jacobian_lens for pair in jacobian_lens_inputs(path)]
    check_not_inputs([("--out", out / name) for name in REPORT_FILES],
                     command_inputs(args, "store", "model", "corpus", defaults={
                         "store": None if args.model is not None else "activations.h5"})
                     + [("--shortcuts", f) for f in files] + lens_files,
                     replaced_folders=[("--out", temporary_path(out.resolve()))])
    for kind in (REPORT_KIND, PAIRWISE_KIND):  # the writers create missing parents
        check_folder_output(out, "--out", kind.names, kind, parents=True)
    return out


def _named_by_folder(lenses: list, paths: list[str]) -> list:
    """Several lenses are each named ``METHOD-FOLDER``, by the fewest trailing path parts that tell them apart."""
    if len(lenses) < 2:
        return lenses
    parts = [Path(p).resolve().with_suffix("").parts if Path(p).is_file() else Path(p).resolve().parts
             for p in paths]
    def name(i: int) -> str:
        for n in range(1, len(parts[i]) + 1):
            if all(other[-n:] != parts[i][-n:] for j, other in enumerate(parts) if j != i):
                break
        return "/".join(parts[i][-n:])

    names = [name(i) for i in range(len(parts))]
    return [sc.replace(label=f"{sc.method}-{name}") for sc, name in zip(lenses, names)]


@command(build_parser)
def main(args) -> int:
    """Command-line entry point of ``python -m njtc_solve.evaluate``."""
    from njtc_solve.maps.jacobian_lens import read_jacobian_lens
    from njtc_solve.maps.tuned_lens import read_tuned_lens
    from njtc_solve.evaluation.report import write_report
    from njtc_solve.maps.shortcuts import Shortcuts

    files = args.shortcuts
    if files is None:
        files = ["shortcuts.safetensors"] if Path("shortcuts.safetensors").is_file() else []
    out = _check_arguments(args, files)
    loaded = [Shortcuts.load(f) for f in files]
    for d in args.tuned_lens:  # a bad folder is refused before a model loads or a row is read
        read_tuned_lens(d)
    for path in args.jacobian_lens:
        read_jacobian_lens(path)
    if args.layers is not None and any(sc.stats.get("n_layers", sc.target_layer) != sc.target_layer for sc in loaded):
        from njtc_solve.maps.compatibility import check_compatible

        for sc in loaded:  # a damaged record is the file's problem, said first
            check_compatible(sc, target="any", head=False)
        raise NJTCError("--layers applies to maps to the last layer; maps to other layers are evaluated whole")
    provenance = next((sc.provenance for sc in loaded if sc.provenance), None)  # the held-out documents
    if args.model is not None:
        plan_settings(args, provenance)  # a bad plan is refused before the model loads
    with rows_from_args(args, provenance, "evaluate") as store:
        # maps to an intermediate layer: per-pair errors (and skip scores with --model), no logit metrics
        pairwise = [sc for sc in loaded if sc.target_layer != store.n_layers]
        loaded = [sc for sc in loaded if sc.target_layer == store.n_layers]
        if pairwise:
            from njtc_solve.evaluation.layer_pairs import evaluate_pairs
            from njtc_solve.evaluation.report import write_pairwise_report

            if args.layers is not None:
                raise NJTCError("--layers applies to maps to the last layer; maps to other layers are evaluated whole")
            pairs = evaluate_pairs(store, pairwise, max_rows=args.max_rows, skip_rows=args.skip_rows, device=args.device,
                                   progress=not args.no_progress, skip_positions=args.skip_positions,
                                   allow_overlap=args.allow_overlap)
        lenses = [read_tuned_lens(d, head=store.head(), model_sha256=store.model_sha256) for d in args.tuned_lens]
        loaded += _named_by_folder(lenses, args.tuned_lens)
        lenses = [read_jacobian_lens(path, head=store.head(), n_layers=store.n_layers, model_sha256=store.model_sha256)
                  for path in args.jacobian_lens]
        loaded += _named_by_folder(lenses, args.jacobian_lens)
        if loaded or not pairwise:
            result = library.evaluate_shortcuts(
                store, loaded, layers=parse_layers(args.layers), max_rows=args.max_rows, chunk_rows=args.chunk_rows,
                device=args.device, progress=not args.no_progress, skip_positions=args.skip_positions,
                allow_overlap=args.allow_overlap)
    if pairwise:
        paths, summary = write_pairwise_report(pairs, out)
        print(summary)
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if loaded or not pairwise:
        result.meta["warnings"] = [translate(w, flags_of(build_parser())) for w in result.meta["warnings"]]
        paths, summary = write_report(result, out)  # the report, as the command's output, speaks of flags
        for warning in result.meta["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
        print(summary)
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


run = entry_point(main)

if __name__ == "__main__":
    raise SystemExit(run())
