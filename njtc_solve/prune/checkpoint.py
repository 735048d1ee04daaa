"""The pruned checkpoint: a standard model folder, marked and described by ``njtc_prune.json``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.outputs import FolderKind, atomic_folder, check_finite, check_folder_output, check_writable

__all__ = ["PRUNE_RECORD", "check_output_folder", "save_pruned"]

PRUNE_RECORD = "njtc_prune.json"
# njtc_prune.json lists the files written; the patterns stand for them in a record without the list
CHECKPOINT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                    "pytorch_model*.bin", "config.json", "generation_config.json", "tokenizer*",
                    "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.*", "added_tokens.json",
                    PRUNE_RECORD)
PRUNED_KIND = FolderKind("a pruned model", PRUNE_RECORD, lambda c: c.get("format") == "njtc-prune", CHECKPOINT_FILES)


def jsonable(value):
    """What ``json.dumps`` writes for a value it cannot: a tensor's list, else its ``str``."""
    return value.tolist() if isinstance(value, torch.Tensor) else str(value)


def save_pruned(model, tokenizer, out: str | Path, *, record: dict, overwrite: bool = False) -> Path:
    """Write a pruned model as a standard checkpoint folder with ``njtc_prune.json`` (``record``), atomically.

    An existing ``out`` is replaced only with ``overwrite`` and only when this function wrote it;
    files in it that this project did not write are kept. A failure leaves ``out`` as it was.
    """
    out = Path(out)
    check_output_folder(out, overwrite=overwrite)
    check_finite(dict(model.named_parameters()), out)  # in the dtype saved: a fold past float16's range
    _drop_gguf_quantizer(model)
    with atomic_folder(out, PRUNED_KIND) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / PRUNE_RECORD).write_text(json.dumps({"format": "njtc-prune", **record}, indent=1, default=jsonable))
    return out


def _drop_gguf_quantizer(model) -> None:
    """Let a model read from GGUF (dequantized, still naming GGUF as its quantizer) save as a plain model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(quantizer.quantization_config, "quant_method", None)
    method = str(getattr(method, "value", method))
    if method != "gguf":
        raise NJTCError(f"a model quantized with {method} cannot be saved pruned; load it unquantized")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def check_output_folder(out, *, overwrite: bool = False, inputs=()) -> None:
    """Refuse an output folder that exists (unless ``overwrite`` and a pruned model) or is an input.

    ``inputs`` are paths the run reads: the output may be none of them, hold one, or be inside one.
    """
    out = Path(out)
    check_writable(out.parent, out)
    target = out.resolve()
    for path in inputs:
        if path is None:
            continue
        p = Path(path).resolve()
        if p == target or target in p.parents or p in target.parents:
            raise NJTCError(f"the output {out} is an input ({path}); choose another folder")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise NJTCError(f"{out} exists; pass `overwrite=True` to replace it")
        if not out.is_dir() or not PRUNED_KIND.is_own(out):
            raise NJTCError(f"{out} exists and is not a pruned model written by njtc_solve (no {PRUNE_RECORD}); "
                            "it is not replaced")
        check_folder_output(out, "`out`", CHECKPOINT_FILES, PRUNED_KIND)
