"""``python -m njtc_solve.lens``: a live model read through its shortcuts for one prompt, layer by
layer: a table, and with ``--out`` the trajectory figure, JSON and CSV."""

from __future__ import annotations

import argparse
from pathlib import Path

from njtc_solve.eval import lens as library
from njtc_solve.core.errors import NJTCError
from njtc_solve.cli import command, prog, run_cli
from njtc_solve.cli.arguments import command_inputs, jacobian_lens_inputs

__all__ = ["build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    p = argparse.ArgumentParser(prog=prog("lens"), description=library.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model: .gguf file, Hugging Face folder or hub name (default: SmolLM2-135M)")
    p.add_argument("--shortcuts", help="shortcut file fitted on this model (default: the logit lens alone)")
    p.add_argument("--tuned-lens", metavar="DIR", help="a tuned-lens folder to read instead of a shortcut file")
    p.add_argument("--jacobian-lens", metavar="DIR", help="a Jacobian-lens folder or .pt file (TransformerLens's "
                   "JacobianLens) to read instead of a shortcut file")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to read")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the text from this UTF-8 file instead")
    p.add_argument("--out", help="folder for trajectory.png, .json and .csv (default: print the table only)")
    p.add_argument("--top-k", type=int, default=5, help="top tokens kept per cell (default: 5)")
    p.add_argument("--color", choices=("kl", "prob"), default="kl",
                   help="cell colour: KL to the final distribution (default) or top-1 probability")
    p.add_argument("--max-positions", type=int, default=24, help="positions drawn in the figure (the last; default 24)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="run the model in this dtype (the maps are checked against its float32 weights)")
    return p


def _prompt_text(args) -> str:
    """The prompt of ``--prompt`` or ``--prompt-file``, checked to be non-empty UTF-8 text."""
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise NJTCError(f"--prompt-file {path} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise NJTCError(f"--prompt-file {path} is not UTF-8 text") from None
        except OSError as err:
            raise NJTCError(f"cannot read --prompt-file {path}: {err.strerror}") from None
        where = f"--prompt-file {path}"
    else:
        text, where = args.prompt, "--prompt"
        try:  # undecodable bytes in the command line arrive as lone surrogates
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise NJTCError("--prompt is not UTF-8 text") from None
    if not text.strip():
        raise NJTCError(f"{where} is empty")
    return text


def _check_arguments(args) -> Path | None:
    """Every check before the model loads: the numbers, the output folder, the lens files."""
    from njtc_solve.core.models import check_device

    if args.top_k < 1:
        raise NJTCError("--top-k must be at least 1")
    if args.max_positions < 1:
        raise NJTCError("--max-positions must be at least 1")
    out = None
    if args.out is not None:
        from njtc_solve.maps.tuned_lens import TUNED_LENS_FILES
        from njtc_solve.core.outputs import check_folder_output, check_not_inputs

        out = Path(args.out)
        lens_files = [("--tuned-lens", Path(args.tuned_lens) / n) for n in TUNED_LENS_FILES] if args.tuned_lens else []
        lens_files += jacobian_lens_inputs(args.jacobian_lens)
        check_not_inputs([("--out", out / name) for name in library.LENS_FILES],
                         command_inputs(args, "model", "shortcuts", "prompt_file") + lens_files)
        check_folder_output(out, "--out", library.LENS_FILES, library.LENS_KIND)
    check_device(args.device)
    given = [flag for flag, value in (("--shortcuts", args.shortcuts), ("--tuned-lens", args.tuned_lens),
                                      ("--jacobian-lens", args.jacobian_lens)) if value is not None]
    if len(given) > 1:
        raise NJTCError(f"{' and '.join(given)} exclude each other: read one lens beside the logit lens")
    return out


@command(build_parser, k="--top-k")
def main(args) -> int:
    """Command-line entry point of ``python -m njtc_solve.lens``."""
    import torch

    from njtc_solve.maps.jacobian_lens import read_jacobian_lens
    from njtc_solve.maps.tuned_lens import read_tuned_lens
    from njtc_solve.core.head import Head
    from njtc_solve.core.models import load_model, model_sha256
    from njtc_solve.maps.shortcuts import Shortcuts

    args.prompt = _prompt_text(args)
    out = _check_arguments(args)
    shortcuts = None if args.shortcuts is None else Shortcuts.load(args.shortcuts)
    vocab = shortcuts.head_description.get("vocab_size") if shortcuts is not None else None
    if isinstance(vocab, int) and args.top_k > vocab:
        raise NJTCError(f"--top-k {args.top_k} is above the vocabulary of the maps' model ({vocab} tokens)")
    if args.tuned_lens is not None:
        read_tuned_lens(args.tuned_lens)  # a bad folder is refused before the model loads
    if args.jacobian_lens is not None:
        read_jacobian_lens(args.jacobian_lens)
    model, tokenizer, name = load_model(args.model, progress=False)
    sha = model_sha256(model)  # of the float32 weights the maps were fitted on
    if args.tuned_lens is not None:
        shortcuts = read_tuned_lens(args.tuned_lens, head=Head.from_model(model), model_sha256=sha)
    if args.jacobian_lens is not None:
        from njtc_solve.core.architectures import resolve_parts

        shortcuts = read_jacobian_lens(args.jacobian_lens, head=Head.from_model(model),
                                       n_layers=len(resolve_parts(model)[1]), model_sha256=sha)
    model.to(device=args.device, dtype=getattr(torch, args.dtype))
    lens = library.ShortcutLens.from_model(model, shortcuts, tokenizer, model_sha256=sha)
    traj = lens.trajectory(args.prompt, k=args.top_k)
    print(f"model: {name}\n{traj.summary()}")
    n = len(traj.token_ids[0])
    if n > args.max_positions:
        print(f"the figure shows the last {args.max_positions} of {n} positions (--max-positions)")
    if out is None:
        return 0
    meta = {"model": name, "shortcuts": args.shortcuts, "tuned_lens": args.tuned_lens,
            "jacobian_lens": args.jacobian_lens, "prompt": args.prompt,
            "methods": traj.methods, "n_layers": traj.n_layers, "dtype": args.dtype}
    paths = library.write_trajectory(traj, out, meta=meta, color=args.color, max_positions=args.max_positions)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def run(argv=None) -> int:
    """Run the command as a process does: one error line and exit status 2 for bad input."""
    return run_cli(main, argv)
