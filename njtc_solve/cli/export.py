"""``python -m njtc_solve.export``: a shortcut file as a tuned-lens folder (the default) or as a
Jacobian-lens folder of TransformerLens (``--format jacobian-lens``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from njtc_solve.maps import jacobian_lens, tuned_lens
from njtc_solve.cli import command, entry_point, prog
from njtc_solve.cli.arguments import command_inputs
from njtc_solve.core.errors import NJTCError

__all__ = ["build_parser", "main", "run"]

FORMATS = {"tuned-lens": tuned_lens, "jacobian-lens": jacobian_lens}
DTYPES = ("float32", "float16", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    p = argparse.ArgumentParser(prog=prog("export"),
                                description=f"{tuned_lens.__doc__}\n{jacobian_lens.__doc__}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", default="tuned-lens", choices=list(FORMATS),
                   help="the format to write (default: tuned-lens)")
    p.add_argument("--shortcuts", required=True, help="shortcut file to export")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", help="the model the maps were fitted on (checked; its name goes into the lens, and "
                   "for tuned-lens its unembedding hash into config.json)")
    p.add_argument("--dtype", choices=DTYPES, help="jacobian-lens only: the storage dtype of J (default: float32, "
                   "read back exactly; float16 is the published lenses')")
    p.add_argument("--overwrite", action="store_true", help="replace a lens already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@command(build_parser, **{"fit_intercept=False": "--no-intercept of the fit command"})
def main(args) -> int:
    """Command-line entry point of ``python -m njtc_solve.export``."""
    import torch

    from njtc_solve.core.outputs import check_not_inputs
    from njtc_solve.maps.shortcuts import Shortcuts

    library = FORMATS[args.format]
    if args.dtype is not None and args.format != "jacobian-lens":
        raise NJTCError("--dtype applies to --format jacobian-lens only (tuned-lens stores float32)")
    files = tuned_lens.TUNED_LENS_FILES if library is tuned_lens else jacobian_lens.JACOBIAN_LENS_FILES
    check_not_inputs([("--out", Path(args.out) / name) for name in files], command_inputs(args, "shortcuts", "model"))
    library.check_output_folder(args.out, overwrite=args.overwrite)  # before a model is loaded
    shortcuts = Shortcuts.load(args.shortcuts)
    exported = library.check_exportable(shortcuts)  # what cannot be exported is refused before a model is loaded
    model = None
    if args.model is not None:
        from njtc_solve.core.models import load_model

        model = load_model(args.model, progress=not args.no_progress)[0]
    if library is tuned_lens:
        out = tuned_lens.export_tuned_lens(shortcuts, args.out, model=model, overwrite=args.overwrite)
        print(f"wrote {out}/config.json and params.pt: {shortcuts.name}, {len(shortcuts.maps)} of "
              f"{shortcuts.target_layer} layers (the others are identity translators)")
        return 0
    out = jacobian_lens.export_jacobian_lens(shortcuts, args.out, model=model, overwrite=args.overwrite,
                                             dtype=getattr(torch, args.dtype or "float32"))
    layers = [j + 1 for j in sorted(exported)]
    note = " (layer 0, the embeddings, has no place in the format: left out)" if 0 in shortcuts.maps else ""
    print(f"wrote {out}/{jacobian_lens.FILENAME}: {shortcuts.name}, maps from layers {layers} as J of block "
          f"outputs {sorted(exported)}{note}")
    return 0


run = entry_point(main)

if __name__ == "__main__":
    raise SystemExit(run())
