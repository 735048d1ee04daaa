"""The one table of supported families: where each keeps its blocks, final norm and unembedding.

An architecture missing from the table is an error, never a guess (a wrong final norm silently
gives wrong shortcuts). Each entry also says how the family makes logits (gain ``w`` or
``1 + w``, an output projection, a logit scale, a soft-cap) and where block pruning folds a map
(:class:`FoldSpec`). Refusals come from the configuration alone (:func:`check_config`,
:func:`check_foldable`), before any weight is read.

Examples
--------
>>> ARCHITECTURES["gemma2"].softcap, ARCHITECTURES["granite"].logit_divisor
('final_logit_softcapping', 'logits_scaling')
>>> from transformers import OPTConfig
>>> check_config(OPTConfig(do_layer_norm_before=False))
Traceback (most recent call last):
...
njtc_solve.core.errors.NJTCError: opt with do_layer_norm_before=False (e.g. OPT-350m) is a post-norm model: its blocks' outputs are normalised inside the block, so there is no pre-norm residual stream to map
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from njtc_solve.core.errors import NJTCError

__all__ = ["ARCHITECTURES", "ArchitectureSpec", "FOLDABLE", "FoldSpec", "GGUF_MODEL_TYPES", "architecture_of", "check_config",
           "check_foldable", "custom_architecture", "projection_of", "resolve_parts"]

# the attribute of a model that carries parts named by the user (trust_remote_code models)
_CUSTOM = "_njtc_architecture"


@dataclass(frozen=True)
class FoldSpec:
    """Where a family's MLP output projection is in a block, which block pruning folds a map into
    (:mod:`njtc_solve.prune.replacement`).

    Attributes
    ----------
    projection : str
        Dotted path inside a block.
    kind : {"linear", "conv1d"}
        ``nn.Linear`` (weight ``out × in``) or GPT-2's ``Conv1D`` (weight ``in × out``).
    bias_option : str, optional
        The config flag that gives the MLP projections biases (Llama's ``mlp_bias``).
    bias_modules : tuple of str
        The projections that flag adds a bias to.
    has_bias : bool
        The projection always has a bias.
    """

    projection: str
    kind: str = "linear"
    bias_option: str | None = None
    bias_modules: tuple[str, ...] = ()
    has_bias: bool = False


@dataclass(frozen=True)
class ArchitectureSpec:
    """Attribute paths, from the ``*ForCausalLM`` model, of the parts a shortcut needs, and its head's form.

    Attributes
    ----------
    blocks, final_norm : str
        Dotted paths of the block list and the final norm.
    norm : {"layernorm", "rmsnorm"}
    gain : {"w", "1+w"}
        The norm stores its gain, or its offset from 1 (Gemma, Nemotron).
    eps : float, optional
        The norm's epsilon where the module has no attribute for it (OLMo).
    projection : str, optional
        Path of a linear map between the norm and the unembedding (OPT's ``project_out``; may be None).
    logit_scale, logit_divisor, softcap : str, optional
        Config attributes of a logit factor (Cohere), divisor (Granite), final soft-cap (Gemma 2/3).
    fold : FoldSpec, optional
        Where a pruning map folds; ``None``: the family cannot be pruned by folding.
    """

    blocks: str
    final_norm: str
    norm: str
    gain: str = "w"
    eps: float | None = None
    projection: str | None = None
    logit_scale: str | None = None
    logit_divisor: str | None = None
    softcap: str | None = None
    fold: FoldSpec | None = None


_LLAMA_LIKE = ArchitectureSpec("model.layers", "model.norm", "rmsnorm")
_GPT2_LIKE = ArchitectureSpec("transformer.h", "transformer.ln_f", "layernorm")
_LAYERNORM_MODEL = ArchitectureSpec("model.layers", "model.norm", "layernorm")
_GEMMA = ArchitectureSpec("model.layers", "model.norm", "rmsnorm", gain="1+w")
_GEMMA_CAPPED = ArchitectureSpec("model.layers", "model.norm", "rmsnorm", gain="1+w",
                                 softcap="final_logit_softcapping")

_DOWN_PROJ = FoldSpec("mlp.down_proj")
_LLAMA_FOLD = FoldSpec("mlp.down_proj", bias_option="mlp_bias",
                       bias_modules=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "gpt2": replace(_GPT2_LIKE, fold=FoldSpec("mlp.c_proj", kind="conv1d", has_bias=True)),
    "gpt_neo": _GPT2_LIKE,
    "gptj": _GPT2_LIKE,
    "codegen": _GPT2_LIKE,
    "bloom": _GPT2_LIKE,
    "falcon": _GPT2_LIKE,
    "gpt_bigcode": _GPT2_LIKE,
    "gpt_neox": ArchitectureSpec("gpt_neox.layers", "gpt_neox.final_layer_norm", "layernorm",
                                 fold=FoldSpec("mlp.dense_4h_to_h", has_bias=True)),
    "llama": replace(_LLAMA_LIKE, fold=_LLAMA_FOLD),
    "mistral": replace(_LLAMA_LIKE, fold=_DOWN_PROJ),
    "mixtral": _LLAMA_LIKE,
    "qwen2_moe": _LLAMA_LIKE,
    "qwen3_moe": _LLAMA_LIKE,
    "qwen2": replace(_LLAMA_LIKE, fold=_DOWN_PROJ),
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "phi": ArchitectureSpec("model.layers", "model.final_layernorm", "layernorm"),
    "stablelm": _LAYERNORM_MODEL,
    "starcoder2": _LAYERNORM_MODEL,
    "nemotron": ArchitectureSpec("model.layers", "model.norm", "layernorm", gain="1+w"),
    "olmo": ArchitectureSpec("model.layers", "model.norm", "layernorm", eps=1e-5),
    "cohere": ArchitectureSpec("model.layers", "model.norm", "layernorm", logit_scale="logit_scale"),
    "granite": ArchitectureSpec("model.layers", "model.norm", "rmsnorm", logit_divisor="logits_scaling"),
    "opt": ArchitectureSpec("model.decoder.layers", "model.decoder.final_layer_norm", "layernorm",
                            projection="model.decoder.project_out"),
    "gemma": _GEMMA,
    "gemma2": _GEMMA_CAPPED,
    "gemma3_text": _GEMMA_CAPPED,
    # the multimodal Gemma 3 checkpoints, read as language models (text in, no image); their
    # forward applies no final soft-cap (Gemma3ForConditionalGeneration)
    "gemma3": ArchitectureSpec("model.language_model.layers", "model.language_model.norm", "rmsnorm", gain="1+w"),
}

# the families whose MLP output projection a map folds into: the table's fold entries
FOLDABLE: dict[str, FoldSpec] = {kind: spec.fold for kind, spec in ARCHITECTURES.items() if spec.fold is not None}

# GGUF architecture names (``general.architecture``) that differ from transformers' model_type
GGUF_MODEL_TYPES = {"gptneox": "gpt_neox", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text",
                    "command-r": "cohere"}


def check_config(config, custom: bool = False) -> ArchitectureSpec | None:
    """Refuse a model from its configuration alone; return its table entry.

    Parameters
    ----------
    config : transformers.PretrainedConfig
    custom : bool
        The user names the parts: an unknown model type is accepted (``None`` returned).

    Raises
    ------
    NJTCError
        An encoder-decoder model, a post-norm model, an unknown type.
    """
    kind = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise NJTCError(f"{kind} is an encoder-decoder model; only decoder-only causal language models are supported")
    if custom:
        return ARCHITECTURES.get(kind)
    if kind not in ARCHITECTURES:
        raise NJTCError(f"unsupported architecture {kind!r}; supported: {', '.join(sorted(ARCHITECTURES))} "
                        "(or name the parts of a `trust_remote_code=True` model with `blocks` and `final_norm`)")
    if kind == "opt" and not getattr(config, "do_layer_norm_before", True):
        raise NJTCError("opt with do_layer_norm_before=False (e.g. OPT-350m) is a post-norm model: its blocks' "
                        "outputs are normalised inside the block, so there is no pre-norm residual stream to map")
    if kind == "opt" and getattr(config, "_remove_final_layer_norm", False):
        raise NJTCError("opt with _remove_final_layer_norm=True has no final norm to apply after a shortcut")
    return ARCHITECTURES[kind]


def check_foldable(config) -> FoldSpec:
    """The :class:`FoldSpec` of ``config``'s family; a family or option that cannot fold is refused."""
    kind = getattr(config, "model_type", None)
    if kind not in FOLDABLE:
        raise NJTCError(f"{kind} cannot be pruned by folding: its MLP output projection is not in the fold table "
                        f"(foldable: {', '.join(sorted(FOLDABLE))})")
    if kind == "gpt2" and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise NJTCError("gpt2 with scale_attn_by_inverse_layer_idx=True scales attention by the block's index, "
                        "which removing blocks changes; it cannot be pruned")
    if getattr(config, "add_cross_attention", False):
        raise NJTCError(f"{kind} with cross-attention is not a decoder-only model; it cannot be pruned")
    return FOLDABLE[kind]


def custom_architecture(model: nn.Module, blocks: str, final_norm: str, norm: str | None = None) -> ArchitectureSpec:
    """Name the parts of a model the table does not know; the spec is attached to ``model``.

    ``norm`` is inferred from the final norm's class name where not given. No logit scale or
    soft-cap is known: the extraction's head check guards such a model.
    """
    module = _get(model, final_norm)
    name = type(module).__name__.lower()
    if norm is None:
        norm = "rmsnorm" if "rms" in name else "layernorm" if "layernorm" in name else None
        if norm is None:
            raise NJTCError(f"cannot tell the kind of final norm {type(module).__name__}; pass `norm` layernorm or rmsnorm")
    if norm not in ("layernorm", "rmsnorm"):
        raise NJTCError(f"`norm` must be layernorm or rmsnorm, not {norm!r}")
    if not isinstance(_get(model, blocks), nn.ModuleList):
        raise NJTCError(f"{blocks!r} is not a list of blocks (an nn.ModuleList)")
    spec = ArchitectureSpec(blocks, final_norm, norm)
    object.__setattr__(model, _CUSTOM, spec)  # a plain attribute, not a submodule
    return spec


def architecture_of(model: nn.Module) -> ArchitectureSpec:
    """The model's parts: those named by :func:`custom_architecture`, else the table's entry."""
    custom = getattr(model, _CUSTOM, None)
    if custom is not None:
        return custom
    return check_config(getattr(model, "config", None))


def _get(model: nn.Module, path: str, optional: bool = False):
    """The attribute at dotted ``path`` (``None`` where missing and ``optional``)."""
    obj = model
    for name in path.split("."):
        if not hasattr(obj, name):
            if optional:
                return None
            raise NJTCError(f"model has no attribute {path!r} (architecture table is out of date?)")
        obj = getattr(obj, name)
    return obj


def resolve_parts(model: nn.Module):
    """``(spec, blocks, final_norm, unembedding)`` of a causal LM; the final norm must be of the table's kind."""
    spec = architecture_of(model)
    blocks = _get(model, spec.blocks)
    final_norm = _get(model, spec.final_norm)
    if final_norm is None:
        raise NJTCError(f"{spec.final_norm} is None: the model has no final norm")
    name = type(final_norm).__name__.lower()
    is_layernorm = isinstance(final_norm, nn.LayerNorm) or "layernorm" in name
    is_rms = "rmsnorm" in name
    if (spec.norm == "layernorm" and not is_layernorm) or (spec.norm == "rmsnorm" and not is_rms):
        raise NJTCError(f"final norm {type(final_norm).__name__} does not match the expected {spec.norm}")
    unembed = model.get_output_embeddings()
    if unembed is None:
        raise NJTCError("model has no output embedding (unembedding)")
    return spec, blocks, final_norm, unembed


def projection_of(model: nn.Module, spec: ArchitectureSpec):
    """The linear map between the final norm and the unembedding, or ``None``."""
    return None if spec.projection is None else _get(model, spec.projection, optional=True)
