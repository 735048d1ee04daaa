"""Where each supported architecture keeps its blocks, final norm and unembedding.

An explicit table, as in tuned-lens: an architecture missing from it is an error, never
a guess, because a wrong final norm silently gives wrong shortcuts.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import NJTCError

__all__ = ["ARCHITECTURES", "ArchitectureSpec", "architecture_of", "check_supported", "resolve_parts"]


@dataclass(frozen=True)
class ArchitectureSpec:
    """Attribute paths, from the ``*ForCausalLM`` model, of the parts a shortcut needs."""

    blocks: str
    final_norm: str
    norm: str  # "layernorm" or "rmsnorm"


_LLAMA_LIKE = ArchitectureSpec("model.layers", "model.norm", "rmsnorm")

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "gpt2": ArchitectureSpec("transformer.h", "transformer.ln_f", "layernorm"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gpt_neox": ArchitectureSpec("gpt_neox.layers", "gpt_neox.final_layer_norm", "layernorm"),
}


def check_supported(model_type: str | None) -> ArchitectureSpec:
    """The table entry of ``model_type``; an architecture missing from it is an error."""
    if model_type not in ARCHITECTURES:
        raise NJTCError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def architecture_of(model: nn.Module) -> ArchitectureSpec:
    """Look up the model's architecture in :data:`ARCHITECTURES`; raise if it is not there."""
    return check_supported(getattr(getattr(model, "config", None), "model_type", None))


def _get(model: nn.Module, path: str):
    obj = model
    for name in path.split("."):
        if not hasattr(obj, name):
            raise NJTCError(f"model has no attribute {path!r} (architecture table is out of date?)")
        obj = getattr(obj, name)
    return obj


def resolve_parts(model: nn.Module):
    """Return ``(spec, blocks, final_norm, unembedding)`` of a causal language model.

    The final norm's class must match the table's norm kind, so that a layer norm is never
    applied as an RMS norm or the other way round.
    """
    spec = architecture_of(model)
    blocks = _get(model, spec.blocks)
    final_norm = _get(model, spec.final_norm)
    is_layernorm = isinstance(final_norm, nn.LayerNorm)
    is_rms = "rmsnorm" in type(final_norm).__name__.lower()
    if (spec.norm == "layernorm" and not is_layernorm) or (spec.norm == "rmsnorm" and not is_rms):
        raise NJTCError(
            f"final norm {type(final_norm).__name__} does not match the expected {spec.norm}"
        )
    unembed = model.get_output_embeddings()
    if unembed is None:
        raise NJTCError("model has no output embedding (unembedding)")
    return spec, blocks, final_norm, unembed
