"""``python -m njtc_solve.lens``: a live model read through its shortcuts for one or more prompts,
layer by layer: a table, and with ``--out`` the trajectory figure, JSON, CSV and interactive page."""

from __future__ import annotations

import argparse
from pathlib import Path

from njtc_solve.evaluation import lens as library
from njtc_solve.core.errors import NJTCError
from njtc_solve.cli import command, entry_point, prog
from njtc_solve.cli.arguments import command_inputs, jacobian_lens_inputs, prompt_text

__all__ = ["build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    p = argparse.ArgumentParser(prog=prog("lens"), description=library.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model: .gguf file, Hugging Face folder or hub name (default: SmolLM2-135M)")
    p.add_argument("--shortcuts", action="append", metavar="FILE",
                   help="shortcut file fitted on this model; repeat it to read several (default: the logit lens alone)")
    p.add_argument("--tuned-lens", metavar="DIR", help="a tuned-lens folder to read as well")
    p.add_argument("--jacobian-lens", metavar="DIR", help="a Jacobian-lens folder or .pt file (TransformerLens's "
                   "JacobianLens) to read as well")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to read")
    prompt.add_argument("--prompt-file", metavar="FILE",
                        help="read the prompts from this UTF-8 file instead, one per line (blank lines skipped)")
    p.add_argument("--out", help="folder for trajectory.png, .json, .csv and lens.html (the interactive page; "
                   "default: print the table only)")
    p.add_argument("--top-k", type=int, default=10, help="top tokens kept per cell (default: 10)")
    p.add_argument("--color", choices=("kl", "prob"), default="kl",
                   help="cell colour: KL to the final distribution (default) or top-1 probability")
    p.add_argument("--max-positions", type=int, default=24, help="positions drawn in the figure (the last; default 24)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="run the model in this dtype (the maps are checked against its float32 weights)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _prompt_texts(args) -> list[str]:
    """The prompts: ``--prompt``, or each non-blank line of ``--prompt-file``; checked to be UTF-8 text."""
    text, where = prompt_text(args)
    prompts = [text] if args.prompt_file is None else [line for line in text.splitlines() if line.strip()]
    if not prompts or not text.strip():
        raise NJTCError(f"{where} is empty" if args.prompt_file is None else f"{where} holds no prompt (one per line)")
    return prompts


def _check_context(args, prompts: list[str]) -> None:
    """Refuse a prompt longer than the model's context before the model loads (only a prompt of more
    UTF-8 bytes than the context, less a margin, is tokenised)."""
    from njtc_solve.core.models import context_length, load_tokenizer, model_config

    limit = context_length(model_config(args.model))
    if limit is None or all(len(text.encode("utf-8")) + 16 <= limit for text in prompts):
        return
    tokenizer = load_tokenizer(args.model)
    for i, text in enumerate(prompts):
        n = len(tokenizer(text)["input_ids"])
        if n > limit:
            where = "--prompt" if args.prompt_file is None else f"prompt {i + 1} of --prompt-file {args.prompt_file}"
            raise NJTCError(f"{where} has {n} tokens; the model reads at most {limit}")


def _check_arguments(args):
    """Every check before the model loads; ``(LensSpec, output folder or None)``."""
    spec = library.LensSpec(k=args.top_k, color=args.color, max_positions=args.max_positions, device=args.device,
                            dtype=args.dtype)
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
    seen = set()
    for path in args.shortcuts or []:
        if Path(path).resolve() in seen:
            raise NJTCError(f"--shortcuts {path} is given twice")
        seen.add(Path(path).resolve())
    return spec, out


def _lens_names(lenses) -> list[str]:
    """Distinct names of the lenses ``(path, Shortcuts)``: a name given twice gets its file's name, or path, too."""
    names = [sc.name for _, sc in lenses]
    names = [name if names.count(name) == 1 else f"{name} ({Path(path).name})" for name, (path, _) in zip(names, lenses)]
    return [name if names.count(name) == 1 else f"{name.rpartition(' (')[0]} ({path})"
            for name, (path, _) in zip(names, lenses)]


@command(build_parser, k="--top-k")
def main(args) -> int:
    """Command-line entry point of ``python -m njtc_solve.lens``."""
    import torch

    from njtc_solve.maps.compatibility import check_compatible
    from njtc_solve.maps.jacobian_lens import read_jacobian_lens
    from njtc_solve.maps.tuned_lens import read_tuned_lens
    from njtc_solve.core.head import Head
    from njtc_solve.core.models import load_model, model_sha256
    from njtc_solve.maps.shortcuts import Shortcuts

    prompts = _prompt_texts(args)
    spec, out = _check_arguments(args)
    lenses = [(str(path), Shortcuts.load(path)) for path in args.shortcuts or []]
    for _, shortcuts in lenses:
        spec.check_maps(shortcuts)
    if args.tuned_lens is not None:
        read_tuned_lens(args.tuned_lens)  # a bad folder is refused before the model loads
    if args.jacobian_lens is not None:
        read_jacobian_lens(args.jacobian_lens)
    _check_context(args, prompts)
    model, tokenizer, name = load_model(args.model, progress=not args.no_progress)
    sha = model_sha256(model)  # of the float32 weights the maps were fitted on
    if args.tuned_lens is not None:
        lenses.append((args.tuned_lens, read_tuned_lens(args.tuned_lens, head=Head.from_model(model), model_sha256=sha)))
    if args.jacobian_lens is not None:
        from njtc_solve.core.decoder import Decoder

        lenses.append((args.jacobian_lens, read_jacobian_lens(args.jacobian_lens, head=Head.from_model(model),
                                                              n_layers=Decoder.of(model).n_blocks, model_sha256=sha)))
    for _, shortcuts in lenses:  # every lens is checked against the model before the first is read
        check_compatible(shortcuts, model, model_sha256=sha)
    model.to(device=args.device, dtype=getattr(torch, args.dtype))
    trajectories = [library.ShortcutLens.from_model(model, shortcuts, tokenizer, model_sha256=sha)
                    .trajectory(prompts, k=args.top_k) for _, shortcuts in lenses or [(None, None)]]
    traj = library.merge_trajectories(trajectories, names=_lens_names(lenses) if lenses else None)
    print(f"model: {name}")
    for i in range(len(prompts)):
        print((f"prompt {i + 1}: " if len(prompts) > 1 else "") + traj.summary(i))
    n = len(traj.token_ids[0])
    if n > args.max_positions:
        print(f"the figure shows the last {args.max_positions} of {n} positions (--max-positions)")
    if out is None:
        return 0
    meta = {"model": name, "shortcuts": args.shortcuts, "tuned_lens": args.tuned_lens,
            "jacobian_lens": args.jacobian_lens, "prompt": prompts[0], "prompts": prompts,
            "methods": traj.methods, "n_layers": traj.n_layers, "dtype": args.dtype,
            "title": f"Lens of {name}"}
    paths = library.write_trajectory(traj, out, meta=meta, color=args.color, max_positions=args.max_positions)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


run = entry_point(main)

if __name__ == "__main__":
    raise SystemExit(run())
