"""Tiny random-weight models built from configs, saved locally: no download needed."""

from __future__ import annotations

import importlib
import importlib.util
import io
import logging
import os
import subprocess
import sys
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from njtc_solve.data.corpus import load_corpus

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The real-model run first, so that under pytest-xdist it overlaps the rest instead of trailing it."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _, docs = load_corpus()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs[:40], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def _randomise_final_norm(norm: torch.nn.Module, generator: torch.Generator) -> None:
    """A gain of exactly 1 hides a norm applied twice; random gain and bias expose it."""
    with torch.no_grad():
        norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=generator))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(0.1 * torch.randn(norm.bias.shape, generator=generator))


def build_tiny_model(kind: str, folder: Path) -> Path:
    """Build and save a tiny random GPT-2 or Llama model with a local tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(folder)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    vocab = len(tok)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=3, n_head=4,
                            eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(config)
        _randomise_final_norm(model.transformer.ln_f, generator)
    elif kind == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                             bos_token_id=tok.eos_token_id)
        model = LlamaForCausalLM(config)
        _randomise_final_norm(model.model.norm, generator)
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: build_tiny_model(kind, root / kind) for kind in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def llama(tiny_models):
    """The tiny Llama and its tokenizer, loaded once per test module."""
    from njtc_solve.core.models import load_model

    model, tokenizer, _ = load_model(str(tiny_models["llama"]), progress=False)
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_store(tiny_models, tmp_path_factory) -> Path:
    """An activation store of the tiny Llama model over the default corpus (all positions)."""
    from njtc_solve.data.extract import extract_activations
    from njtc_solve.core.models import load_model

    out = tmp_path_factory.mktemp("store") / "activations.h5"
    model, tok, name = load_model(str(tiny_models["llama"]))
    _, docs = load_corpus()
    extract_activations(model, tok, docs, out, model_name=name, corpus_name="pydoc_data.topics",
                        seq_len=32, max_tokens=6000, progress=False)
    return out


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` in a subprocess and capture its output."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def sharpened_model(config):
    """A random-weight causal LM from ``config`` (seed 0) with every matrix ×5, so that greedy decoding has
    clear winners and drafts are sometimes accepted."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(5.0)
    return model


@contextmanager
def _streams_to(handlers: dict, stream):
    """Point each logging handler at ``stream`` inside the block, back at its own after."""
    for handler in handlers:
        handler.setStream(stream)
    try:
        yield
    finally:
        for handler, own in handlers.items():
            handler.setStream(own)


def run_command(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run the command ``njtc_solve.cli.<name>`` in this process as :func:`run_module` runs it in another
    (exit status, standard output and error), for the many quick refusals; a warning the command gives
    (those Python shows by default) and what a logger prints (transformers') go to its standard error, as a
    process would print them."""
    command = importlib.import_module(f"njtc_solve.cli.{name}")
    out, err = io.StringIO(), io.StringIO()
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict)]
    streams = {h: h.stream for lg in loggers for h in lg.handlers
               if type(h) is logging.StreamHandler}  # bound to the real stderr when made (transformers' logger)
    with (warnings.catch_warnings(record=True) as caught, redirect_stdout(out), redirect_stderr(err),
          _streams_to(streams, err)):
        warnings.resetwarnings()
        warnings.simplefilter("always")
        for kind in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", kind)
        try:
            code = command.run(list(args))
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
    for w in caught:
        err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno))
    return subprocess.CompletedProcess([name, *args], code, out.getvalue(), err.getvalue())


def benchmark_module(name: str):
    """The module ``benchmarks/{name}.py`` (a script folder, not a package), imported by its path."""
    key = f"benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "benchmarks" / f"{name}.py")
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]
