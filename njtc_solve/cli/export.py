"""``python -m njtc_solve.export``: a shortcut file as a tuned-lens folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from njtc_solve.maps import tuned_lens as library
from njtc_solve.cli import command, run_cli
from njtc_solve.cli.arguments import command_inputs

__all__ = ["build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    p = argparse.ArgumentParser(prog="python -m njtc_solve.export", description=library.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=["tuned-lens"], help="the format to write")
    p.add_argument("--shortcuts", required=True, help="shortcut file to export")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", help="the model the maps were fitted on (checked; its name and unembedding hash go "
                   "into config.json)")
    p.add_argument("--overwrite", action="store_true", help="replace a lens already in --out")
    return p


@command(build_parser)
def main(args) -> int:
    """Command-line entry point of ``python -m njtc_solve.export``."""
    from njtc_solve.core.outputs import check_not_inputs
    from njtc_solve.maps.shortcuts import Shortcuts

    check_not_inputs([("--out", Path(args.out) / name) for name in library.TUNED_LENS_FILES],
                     command_inputs(args, "shortcuts", "model"))
    library.check_output_folder(args.out, overwrite=args.overwrite)  # before a model is loaded
    shortcuts = Shortcuts.load(args.shortcuts)
    library.check_exportable(shortcuts)  # what cannot be exported is refused before a model is loaded
    model = None
    if args.model is not None:
        from njtc_solve.core.models import load_model

        model = load_model(args.model, progress=False)[0]
    out = library.export_tuned_lens(shortcuts, args.out, model=model, overwrite=args.overwrite)
    print(f"wrote {out}/config.json and params.pt: {shortcuts.name}, {len(shortcuts.maps)} of "
          f"{shortcuts.target_layer} layers (the others are identity translators)")
    return 0


def run(argv=None) -> int:
    """Run the command as a process does: one error line and exit status 2 for bad input."""
    return run_cli(main, argv)
