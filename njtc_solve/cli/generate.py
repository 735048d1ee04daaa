"""``python -m njtc_solve.generate``: the model's own greedy text, drafted by a shortcut map and verified.

Self-speculative decoding (:mod:`njtc_solve.infer.speculative`): the first ``--exit-layer``
blocks, the shortcut map of that layer and the model's head draft ``--draft-tokens`` tokens;
the full model verifies them in one pass. The text is the model's greedy text, token for
token. ``--draft-tokens auto`` measures acceptance and cost on held-out text first
(:mod:`njtc_solve.infer.calibrate`) and prints the table it chose from; ``--draft-tokens 0``
runs the model's own ``generate`` and needs no ``--exit-layer``.
"""

from __future__ import annotations

import argparse

from njtc_solve.cli import command, entry_point, prog
from njtc_solve.core.errors import NJTCError

__all__ = ["build_parser", "check_arguments", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    p = argparse.ArgumentParser(prog=prog("generate"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model: .gguf file, Hugging Face folder or hub name (default: SmolLM2-135M)")
    p.add_argument("--shortcuts", help="shortcut file fitted on this model to its last layer "
                   "(default: the logit lens, as transformers' assistant_early_exit drafts)")
    p.add_argument("--exit-layer", type=int, metavar="L",
                   help="draft from the residual stream after this many blocks (1..blocks-1); "
                   "required unless --draft-tokens 0")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from this UTF-8 file instead")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    p.add_argument("--draft-tokens", default="auto",
                   help="tokens drafted per verification, or auto: chosen from measured acceptance and cost "
                        "(default: auto)")
    p.add_argument("--max-draft-tokens", type=int, default=8, help="largest draft length auto considers (default: 8)")
    p.add_argument("--calibration-sequences", type=int, default=4,
                   help="held-out sequences of 128 tokens auto measures acceptance on (default: 4)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _draft_tokens(text: str) -> int | None:
    """``None`` for auto, else the draft length."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise NJTCError(f"--draft-tokens must be auto or a whole number, not {text!r}") from None


def check_arguments(args):
    """Every refusal that needs no weights; ``(prompt, draft tokens or None for auto, shortcuts or None, blocks)``."""
    from njtc_solve.cli.arguments import prompt_text
    from njtc_solve.core.models import context_length, model_config, read_model_config
    from njtc_solve.infer.speculative import GenerateSpec
    from njtc_solve.maps.shortcuts import Shortcuts

    k = _draft_tokens(args.draft_tokens)
    if args.exit_layer is None and k != 0:
        build_parser().error("the following arguments are required: --exit-layer")
    spec = GenerateSpec(args.exit_layer, max_new_tokens=args.max_new_tokens, draft_tokens=k,
                        max_draft_tokens=args.max_draft_tokens, calibration_sequences=args.calibration_sequences,
                        device=args.device)
    text, where = prompt_text(args)
    if not text.strip():
        raise NJTCError(f"{where} is empty")
    _, n_blocks, config = read_model_config(args.model)
    limit = context_length(model_config(args.model) if config is None else config)  # a GGUF file: its metadata
    if limit is not None and args.max_new_tokens >= limit:
        raise NJTCError(f"--max-new-tokens {args.max_new_tokens} reaches past the model's context of {limit} tokens "
                        "(the prompt takes at least one)")
    shortcuts = None if args.shortcuts is None else Shortcuts.load(args.shortcuts)
    spec.check_model(n_blocks, getattr(config, "hidden_size", None), shortcuts, where=args.shortcuts)
    return text, spec.draft_tokens, shortcuts, n_blocks


@command(build_parser)
def main(args) -> int:
    """Command-line entry point of ``python -m njtc_solve.generate``."""
    import torch

    from njtc_solve.core.models import context_length, load_model, model_sha256
    from njtc_solve.infer.speculative import ShortcutDrafter, check_greedy_config, speculative_generate

    text, k, shortcuts, _ = check_arguments(args)
    model, tokenizer, name = load_model(args.model, device=args.device, progress=not args.no_progress)
    check_greedy_config(model)  # before the calibration: a generation config that is not the argmax is refused
    drafter = None
    if args.exit_layer is not None:
        sha = None if shortcuts is None or shortcuts.method == "identity" else model_sha256(model)
        drafter = ShortcutDrafter(model, shortcuts, args.exit_layer, model_sha256=sha)  # another model's maps: refused
    if k is None:
        from njtc_solve.data.corpus import load_corpus
        from njtc_solve.infer.calibrate import calibrate, held_out_sequences

        _, documents = load_corpus()
        limit = context_length(model.config) or 128
        sequences = held_out_sequences(tokenizer, documents, drafter.shortcuts, seq_len=min(128, int(limit)),
                                       max_sequences=args.calibration_sequences)
        table = calibrate(model, sequences, {drafter.shortcuts.name: drafter.shortcuts}, [args.exit_layer],
                          max_draft_tokens=args.max_draft_tokens, check=False)
        k = table.best["draft_tokens"]
        print(f"calibration on {len(sequences)} held-out sequences of {sequences[0].shape[1]} tokens "
              f"(pydoc_data.topics)\n{table.format()}\n"
              f"--draft-tokens auto: {k}")
    ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
    if ids.shape[1] == 0:
        raise NJTCError("--prompt has no tokens")
    with torch.no_grad():
        result = speculative_generate(model, ids, drafter=drafter, max_new_tokens=args.max_new_tokens, draft_tokens=k)
    print(tokenizer.decode(result.sequences[0, ids.shape[1]:], skip_special_tokens=True))
    print(_summary(result.stats, name, None if drafter is None else drafter.name, k))
    return 0


def _summary(s, model: str, draft: str | None, k: int) -> str:
    """What the run did, in words and figures that are all defined (no ``nan``)."""
    rate = f" ({s.tokens_per_second:.1f} tokens/s)" if s.seconds > 0 else ""
    if k == 0:
        return (f"model: {model}; no draft (0 tokens per verification): the model's own greedy decoding\n"
                f"{s.new_tokens} tokens in {s.seconds:.2f} s{rate}")
    line = (f"model: {model}; draft: {draft}, {k} tokens per verification drafted\n"
            f"{s.new_tokens} tokens in {s.seconds:.2f} s{rate}; {s.verifications} verifications")
    if s.verifications:
        line += f", {s.tokens_per_verification:.2f} tokens per verification"
    if s.drafted:
        line += f"; acceptance {s.acceptance_rate:.3f} ({s.accepted} of {s.drafted} drafts)"
    else:
        line += "; nothing was drafted"
    return line


run = entry_point(main)

if __name__ == "__main__":
    raise SystemExit(run())
