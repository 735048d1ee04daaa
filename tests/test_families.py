"""Every family of the architecture table, as a tiny random model: its head, its layers, its extraction.

Each model randomises what a wrong head would miss: the final norm's gain and bias, the
unembedding's bias, Gemma's ``1 + w`` gain, a logit scale or divisor, a soft-cap, OPT's
output projection. The fault-injection tests show that dropping any one of them is caught.
"""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import torch

from conftest import _tokenizer, run_module
from njtc_solve.core import architectures
from njtc_solve.core.architectures import ARCHITECTURES, resolve_parts
from njtc_solve.data.capture import capture_residual_stream
from njtc_solve.data.corpus import load_corpus
from njtc_solve.core.errors import NJTCError
from njtc_solve.data.extract import extract_activations
from njtc_solve.core.head import Head
from njtc_solve.core.models import load_model
from njtc_solve.data.store import ActivationStore

_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64)


def _config(family: str, vocab: int, u: torch.Tensor):
    """A tiny configuration of ``family``; ``u`` (uniform in [0, 1)) randomises scales and caps."""
    import transformers as T

    common = dict(vocab_size=vocab, **_SIZES)
    gemma = dict(common, num_key_value_heads=2, head_dim=8)
    opt = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
               max_position_embeddings=64)
    makers = {
        "gpt2": lambda: T.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4),
        "gpt_neo": lambda: T.GPTNeoConfig(vocab_size=vocab, max_position_embeddings=64, hidden_size=32, num_layers=2,
                                          num_heads=4, attention_types=[[["global", "local"], 1]], window_size=8,
                                          intermediate_size=64),
        "gptj": lambda: T.GPTJConfig(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                     n_inner=64),
        "codegen": lambda: T.CodeGenConfig(vocab_size=vocab, n_positions=64, n_ctx=64, n_embd=32, n_layer=2,
                                           n_head=4, rotary_dim=4),
        "bloom": lambda: T.BloomConfig(vocab_size=vocab, hidden_size=32, n_layer=2, n_head=4),
        "falcon": lambda: T.FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        "gpt_bigcode": lambda: T.GPTBigCodeConfig(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4),
        "gpt_neox": lambda: T.GPTNeoXConfig(**common),
        "llama": lambda: T.LlamaConfig(**common, num_key_value_heads=2),
        "mistral": lambda: T.MistralConfig(**common, num_key_value_heads=2),
        "mixtral": lambda: T.MixtralConfig(**common, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        "qwen2": lambda: T.Qwen2Config(**common, num_key_value_heads=2),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**common, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32, shared_expert_intermediate_size=32),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**common, num_key_value_heads=2, head_dim=8, num_experts=4,
                                              num_experts_per_tok=2, moe_intermediate_size=32),
        "nemotron": lambda: T.NemotronConfig(**common, num_key_value_heads=2),
        "qwen3": lambda: T.Qwen3Config(**common, num_key_value_heads=2, head_dim=8),
        "phi3": lambda: T.Phi3Config(**common, num_key_value_heads=2),
        "phi": lambda: T.PhiConfig(**common, partial_rotary_factor=0.5),
        "stablelm": lambda: T.StableLmConfig(**common, num_key_value_heads=4),
        "starcoder2": lambda: T.Starcoder2Config(**common, num_key_value_heads=2),
        "olmo": lambda: T.OlmoConfig(**common),
        "olmo2": lambda: T.Olmo2Config(**common),
        "opt": lambda: T.OPTConfig(**opt, word_embed_proj_dim=32),
        "opt-project-out": lambda: T.OPTConfig(**opt, word_embed_proj_dim=16),
        "gemma": lambda: T.GemmaConfig(**gemma),
        "gemma2": lambda: T.Gemma2Config(**gemma, final_logit_softcapping=0.3 + 0.3 * float(u[0]), sliding_window=8,
                                         query_pre_attn_scalar=8),
        "gemma3_text": lambda: T.Gemma3TextConfig(**gemma, final_logit_softcapping=0.3 + 0.3 * float(u[0]),
                                                  sliding_window=8, query_pre_attn_scalar=8),
        "gemma3": lambda: T.Gemma3Config(  # image tokens beyond the tokenizer's vocabulary
            text_config=dict(gemma, vocab_size=vocab + 3, sliding_window=8, query_pre_attn_scalar=8,
                             model_type="gemma3_text"),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14, model_type="siglip_vision_model"),
            mm_tokens_per_image=4, image_token_index=vocab, boi_token_index=vocab + 1, eoi_token_index=vocab + 2),
        "granite": lambda: T.GraniteConfig(**common, logits_scaling=2.0 + 6.0 * float(u[0]),
                                           embedding_multiplier=1.0 + float(u[1]), residual_multiplier=0.5,
                                           attention_multiplier=0.2),
        "cohere": lambda: T.CohereConfig(**common, logit_scale=0.3 + float(u[0])),
    }
    return makers[family]()


FAMILIES = ["gpt2", "gpt_neo", "gptj", "codegen", "bloom", "falcon", "gpt_bigcode", "gpt_neox", "llama", "mistral",
            "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "phi", "stablelm", "starcoder2", "olmo",
            "olmo2", "nemotron", "opt", "opt-project-out", "gemma", "gemma2", "gemma3_text", "gemma3", "granite", "cohere"]


def test_every_table_entry_has_a_family_test():
    assert {f.split("-")[0] for f in FAMILIES} == set(ARCHITECTURES)


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    _tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def documents():
    return load_corpus()[1][:60]


def build_family(family: str, folder, tokenizer_folder):
    """Save a tiny random model of ``family`` with random head parameters, and the shared tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    generator = torch.Generator().manual_seed(sum(map(ord, family)))
    config = _config(family, len(tok), torch.rand(2, generator=generator))
    config.eos_token_id = config.bos_token_id = tok.eos_token_id
    config.pad_token_id = None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    _, _, final_norm, unembed = resolve_parts(model)
    with torch.no_grad():  # a gain of exactly 1, a zero bias, hide a missing or doubled piece
        for p in (getattr(final_norm, "weight", None), getattr(final_norm, "bias", None),
                  getattr(unembed, "bias", None)):
            if p is not None:
                p.copy_(0.5 + torch.rand(p.shape, generator=generator))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory, tokenizer_folder):
    folder = build_family(request.param, tmp_path_factory.mktemp(request.param), tokenizer_folder)
    model, tok, name = load_model(str(folder), progress=False)
    return request.param, folder, model, tok


def _forward(model, ids):
    with capture_residual_stream(model) as hidden, torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return [h.clone() for h in hidden], out


def _rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_head_reproduces_the_logits_and_layers_match(family_model):
    """(a) head(h_L) is the model's logits; (b) layers 0..L-1 are HF's hidden states, L is before the norm."""
    family, _, model, tok = family_model
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    hidden, out = _forward(model, ids)
    spec, blocks, final_norm, _ = resolve_parts(model)
    n_layers = len(blocks)
    assert len(hidden) == len(out.hidden_states) == n_layers + 1
    head = Head.from_model(model)
    logits = head.logits(hidden[n_layers].reshape(-1, head.d_model))
    assert _rel_err(logits, out.logits.reshape(logits.shape)) < 1e-5
    for layer in range(n_layers):
        torch.testing.assert_close(hidden[layer], out.hidden_states[layer], rtol=0, atol=0)
    with torch.no_grad():  # HF's last hidden state has the final norm (and any projection) applied
        normed = final_norm(hidden[n_layers])
        projection = architectures.projection_of(model, spec)
        normed = normed if projection is None else projection(normed)
        torch.testing.assert_close(normed, out.hidden_states[n_layers], rtol=1e-5, atol=1e-6)
        assert _rel_err(hidden[n_layers], final_norm(hidden[n_layers])) > 1e-2, "layer L must be before the norm"


def test_extraction_head_check_passes(family_model, documents, tmp_path):
    """(c) a small extraction runs; its head check against the model's own logits passes."""
    family, _, model, tok = family_model
    out = extract_activations(model, tok, documents, tmp_path / "a.h5", seq_len=16, max_tokens=128, batch_size=4,
                              progress=False)
    with ActivationStore(out) as store:
        assert store.attrs["head_check_rel_err"] < 1e-5 and store.attrs["head_check_top1_agreement"] == 1.0
        head = store.head()
        assert head.fingerprint() == Head.from_model(model).fingerprint()
        assert store.attrs["architecture"] == model.config.model_type


# -- a missing piece is caught -----------------------------------------------------------------

def _without_gain_offset(head, model):
    return dataclasses.replace(head, norm_weight=head.norm_weight - 1)


_FAULTS = {
    "gemma": ("the 1+w gain read as w", _without_gain_offset),
    "nemotron": ("the 1+w LayerNorm gain read as w", _without_gain_offset),
    "gemma2": ("no soft-cap", lambda head, model: dataclasses.replace(head, softcap=None)),
    "gemma3_text": ("no soft-cap", lambda head, model: dataclasses.replace(head, softcap=None)),
    "granite": ("no logits_scaling", lambda head, model: dataclasses.replace(head, logit_scale=1.0)),
    "cohere": ("no logit_scale", lambda head, model: dataclasses.replace(head, logit_scale=1.0)),
    "phi": ("no unembedding bias", lambda head, model: dataclasses.replace(head, unembed_bias=None)),
    "gpt_neo": ("no norm bias", lambda head, model: dataclasses.replace(head, norm_bias=None)),
    "olmo": ("an RMS norm for a LayerNorm", lambda head, model: dataclasses.replace(head, norm="rmsnorm")),
    "cohere-norm": ("an RMS norm for Cohere's LayerNorm", lambda head, model: dataclasses.replace(head, norm="rmsnorm")),
    "llama": ("the gain applied twice", lambda head, model: dataclasses.replace(
        head, norm_weight=head.norm_weight ** 2)),
}


@pytest.mark.parametrize("case", sorted(_FAULTS))
def test_a_head_missing_a_piece_does_not_match(case, tmp_path, tokenizer_folder):
    family = case.split("-")[0]
    _, fault = _FAULTS[case]
    model, tok, _ = load_model(str(build_family(family, tmp_path / family, tokenizer_folder)), progress=False)
    ids = torch.randint(0, len(tok), (1, 12), generator=torch.Generator().manual_seed(0))
    hidden, out = _forward(model, ids)
    head = Head.from_model(model)
    own = out.logits[0]
    assert _rel_err(head.logits(hidden[-1][0]), own) < 1e-5
    assert _rel_err(fault(head, model).logits(hidden[-1][0]), own) > 1e-3


def test_a_table_entry_missing_a_piece_fails_the_extraction_head_check(tmp_path, tokenizer_folder, documents,
                                                                       monkeypatch):
    """A table entry without Gemma 2's soft-cap stops the extraction after its first batch."""
    model, tok, _ = load_model(str(build_family("gemma2", tmp_path / "g", tokenizer_folder)), progress=False)
    monkeypatch.setitem(ARCHITECTURES, "gemma2", dataclasses.replace(ARCHITECTURES["gemma2"], softcap=None))
    with pytest.raises(NJTCError, match="does not reproduce the model's logits"):
        extract_activations(model, tok, documents, tmp_path / "a.h5", seq_len=16, max_tokens=128, progress=False)
    assert not (tmp_path / "a.h5").exists()


def test_a_missing_output_projection_is_refused(tmp_path, tokenizer_folder, monkeypatch):
    model, _, _ = load_model(str(build_family("opt-project-out", tmp_path / "o", tokenizer_folder)), progress=False)
    monkeypatch.setitem(ARCHITECTURES, "opt", dataclasses.replace(ARCHITECTURES["opt"], projection=None))
    with pytest.raises(NJTCError, match="output projection between them is missing"):
        Head.from_model(model)


# -- the head's description, in stores and files ----------------------------------------------

def _random_head(softcap=0.7, scale=0.3) -> Head:
    g = torch.Generator().manual_seed(3)
    return Head("layernorm", 1e-5, torch.rand(6, generator=g) + 0.5, torch.randn(20, 6, generator=g),
                norm_bias=torch.randn(6, generator=g), unembed_bias=torch.randn(20, generator=g),
                logit_scale=scale, softcap=softcap, folded=("1+w gain",))


def test_head_round_trips_through_hdf5_and_tensors(tmp_path):
    h = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    for head in (_random_head(), _random_head(softcap=None, scale=1.0),
                 dataclasses.replace(_random_head(), norm_weight=None, norm_bias=None, norm="rmsnorm")):
        with h5py.File(tmp_path / "h.h5", "w") as f:
            head.write_group(f.create_group("head"))
        with h5py.File(tmp_path / "h.h5", "r") as f:
            read = Head.from_group(f["head"])
        again = Head.from_tensors(head.to_tensors("x."), head.describe(), "x.")
        for other in (read, again):
            assert other.describe() == head.describe() and other.fingerprint() == head.fingerprint()
            torch.testing.assert_close(other.logits(h), head.logits(h), rtol=0, atol=0)
    assert _random_head().fingerprint() != _random_head(softcap=0.8).fingerprint()


def test_a_version_1_head_group_is_read(tmp_path):
    """Format-1 stores have only ``norm`` and ``eps`` and the four tensors: no scale, no cap."""
    head = _random_head(softcap=None, scale=1.0)
    with h5py.File(tmp_path / "v1.h5", "w") as f:
        group = f.create_group("head")
        group.attrs["norm"], group.attrs["eps"] = "layernorm", 1e-5
        for name in ("norm_weight", "norm_bias", "unembed", "unembed_bias"):
            group[name] = getattr(head, name).numpy()
    with h5py.File(tmp_path / "v1.h5", "r") as f:
        read = Head.from_group(f["head"])
    h = torch.randn(4, 6)
    torch.testing.assert_close(read.logits(h), head.logits(h), rtol=0, atol=0)
    assert read.logit_scale == 1.0 and read.softcap is None
    with h5py.File(tmp_path / "v1.h5", "r+") as f:
        del f["head/norm_weight"]
    with h5py.File(tmp_path / "v1.h5", "r") as f, pytest.raises(NJTCError, match="damaged"):
        Head.from_group(f["head"])


def test_a_version_1_store_is_read(tiny_store, tmp_path):
    """A store written before format 2 (its head group without the new attributes) still opens."""
    import shutil

    old = tmp_path / "v1.h5"
    shutil.copy(tiny_store, old)
    with h5py.File(old, "r+") as f:
        f.attrs["format_version"] = 1
        for key in ("logit_scale", "softcap", "has_norm_weight", "folded"):
            del f["head"].attrs[key]
    with ActivationStore(tiny_store) as new, ActivationStore(old) as store:
        assert store.head().fingerprint() == new.head().fingerprint()
        y = torch.from_numpy(np.asarray(store.read(f"hidden/{store.n_layers}")[:8], dtype=np.float32))
        torch.testing.assert_close(store.head().logits(y), new.head().logits(y), rtol=0, atol=0)


def test_low_rank_logits_are_exact_with_scale_and_softcap():
    """The rank-r route applies the same scale and soft-cap as the full one."""
    g = torch.Generator().manual_seed(5)
    a, V, bias = torch.randn(7, 3, generator=g), torch.randn(3, 6, generator=g), torch.randn(6, generator=g)
    for head in (_random_head(), dataclasses.replace(_random_head(), norm="rmsnorm", norm_weight=None)):
        y = a @ V + bias
        torch.testing.assert_close(head.low_rank_logits(a, V, bias, y), head.logits(y), rtol=1e-5, atol=1e-5)


def test_logit_weight_factor_carries_the_scale():
    head = _random_head(softcap=None, scale=1.0)
    torch.testing.assert_close(_random_head(softcap=None, scale=0.3).logit_weight_factor(),
                               0.3 * head.logit_weight_factor())


# -- refusals ---------------------------------------------------------------------------------

def _refusal(tmp_path, config, *extra):
    """Run the extraction CLI on a folder holding only ``config`` (no weights, no tokenizer)."""
    folder = tmp_path / "model"
    if config is not None:
        config.save_pretrained(folder)
    result = run_module("njtc_solve.extract", "--model", str(folder), "--out", str(tmp_path / "a.h5"),
                        "--no-progress", *extra)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_refusals_from_the_config_alone(tmp_path):
    """Post-norm OPT, encoder-decoder models and remote code without named parts: one line, before any weight."""
    from transformers import BartConfig, OPTConfig, T5Config

    assert "post-norm" in _refusal(tmp_path / "opt", OPTConfig(do_layer_norm_before=False))
    assert "encoder-decoder" in _refusal(tmp_path / "t5", T5Config())
    assert "encoder-decoder" in _refusal(tmp_path / "bart", BartConfig())
    assert "--blocks and --final-norm" in _refusal(tmp_path / "remote", OPTConfig(), "--trust-remote-code")


def test_named_parts_are_guarded_by_the_head_check(tmp_path, tokenizer_folder, documents):
    """Parts named by the user are used (and win over the table), and the head check still guards them."""
    folder = build_family("llama", tmp_path / "llama", tokenizer_folder)
    model, tok, _ = load_model(str(folder), progress=False, trust_remote_code=True, blocks="model.layers",
                               final_norm="model.norm")
    assert architectures.architecture_of(model) == architectures.ArchitectureSpec("model.layers", "model.norm",
                                                                                    "rmsnorm")
    extract_activations(model, tok, documents, tmp_path / "ok.h5", seq_len=16, max_tokens=128, progress=False)
    wrong, tok, _ = load_model(str(folder), progress=False, trust_remote_code=True, blocks="model.layers",
                               final_norm="model.layers.0.input_layernorm")
    with pytest.raises(NJTCError, match="does not reproduce the model's logits"):
        extract_activations(wrong, tok, documents, tmp_path / "bad.h5", seq_len=16, max_tokens=128, progress=False)
    with pytest.raises(NJTCError, match="name both parts"):
        load_model(str(folder), progress=False, blocks="model.layers")
    with pytest.raises(NJTCError, match="`norm` describes named parts"):
        load_model(str(folder), progress=False, norm="rmsnorm")


def test_the_cli_takes_named_parts_a_model_dtype_and_a_device_map(tmp_path, tokenizer_folder):
    folder = build_family("gpt2", tmp_path / "gpt2", tokenizer_folder)
    result = run_module("njtc_solve.extract", "--model", str(folder), "--out", str(tmp_path / "a.h5"),
                        "--no-progress", "--seq-len", "16", "--max-tokens", "128", "--trust-remote-code",
                        "--blocks", "transformer.h", "--final-norm", "transformer.ln_f", "--model-dtype", "float32",
                        "--device-map", "cpu")
    assert result.returncode == 0, result.stderr
    assert "head check: relative error" in result.stdout


def test_shortcut_files_record_the_head(tmp_path):
    """A shortcut file keeps the head's description and hash; files without them still load."""
    from safetensors.torch import load_file, save_file

    from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts

    head = _random_head()
    maps = {1: ShortcutMap(weight=torch.eye(6), bias=torch.zeros(6))}
    Shortcuts("jtc", maps, 2, head_description=head.describe(), head_sha256=head.fingerprint()).save(tmp_path / "s.safetensors")
    loaded = Shortcuts.load(tmp_path / "s.safetensors")
    assert loaded.head_description == head.describe() and loaded.head_sha256 == head.fingerprint()
    loaded.check_head(head)
    with pytest.raises(NJTCError, match="fitted for another head"):
        loaded.check_head(_random_head(softcap=None))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k not in ("head", "head_sha256")}
    save_file(load_file(tmp_path / "s.safetensors"), str(tmp_path / "old.safetensors"), metadata=meta)
    old = Shortcuts.load(tmp_path / "old.safetensors")
    assert old.head_description == {} and old.head_sha256 == ""
    old.check_head(_random_head(softcap=None))  # nothing recorded: nothing to refuse


@pytest.mark.parametrize("family", ["gemma2", "granite", "opt-project-out"])
def test_half_precision_models_pass_the_head_check(family, tmp_path, tokenizer_folder, documents):
    """``--model-dtype``: the weights load in bfloat16 / float16 and the float32 head still matches."""
    folder = build_family(family, tmp_path / family, tokenizer_folder)
    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        model, tok, _ = load_model(str(folder), progress=False, dtype=dtype)
        assert next(model.parameters()).dtype == torch_dtype
        out = extract_activations(model, tok, documents, tmp_path / f"{dtype}.h5", seq_len=16, max_tokens=128,
                                  progress=False)
        with ActivationStore(out) as store:
            assert store.attrs["head_check_rel_err"] < 2e-2
    with pytest.raises(NJTCError, match="`dtype` must be one of"):
        load_model(str(folder), progress=False, dtype="float64")


_REMOTE_CONFIG = '''from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"

    def __init__(self, logit_multiplier=1.0, **kwargs):
        self.logit_multiplier = logit_multiplier
        super().__init__(**kwargs)
'''

_REMOTE_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * self.config.logit_multiplier  # a head the table cannot know about
        return out
'''


def _remote_code_model(folder, tokenizer_folder, logit_multiplier: float):
    """A model whose code lives in its folder (``auto_map``), of a type no table knows."""
    import importlib.util
    import json
    import sys
    import types

    from transformers import AutoTokenizer

    folder.mkdir(parents=True)
    (folder / "configuration_tiny_remote.py").write_text(_REMOTE_CONFIG)
    (folder / "modeling_tiny_remote.py").write_text(_REMOTE_MODEL)
    package = types.ModuleType(f"remote_{folder.name}")  # build the model once here, from the same files
    package.__path__ = [str(folder)]
    sys.modules[package.__name__] = package
    modules = {}
    for name in ("configuration_tiny_remote", "modeling_tiny_remote"):
        spec = importlib.util.spec_from_file_location(f"{package.__name__}.{name}", folder / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = modules[name]
        spec.loader.exec_module(modules[name])
    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = modules["configuration_tiny_remote"].TinyRemoteConfig(
        logit_multiplier=logit_multiplier, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id, **_SIZES, num_key_value_heads=2)
    torch.manual_seed(0)
    modules["modeling_tiny_remote"].TinyRemoteForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    saved["auto_map"] = {"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                         "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"}
    (folder / "config.json").write_text(json.dumps(saved))
    return folder


def test_trust_remote_code_with_named_parts(tmp_path, tokenizer_folder, documents):
    """Remote code runs only with its parts named, and the head check still stops a head it cannot see."""
    plain = _remote_code_model(tmp_path / "plain", tokenizer_folder, 1.0)
    with pytest.raises(NJTCError, match="`trust_remote_code=True` runs code"):
        load_model(str(plain), progress=False, trust_remote_code=True)
    with pytest.raises(NJTCError, match="cannot load model"):  # transformers asks for trust_remote_code
        load_model(str(plain), progress=False, blocks="model.layers", final_norm="model.norm")
    parts = dict(trust_remote_code=True, blocks="model.layers", final_norm="model.norm")
    model, tok, _ = load_model(str(plain), progress=False, **parts)
    assert type(model).__name__ == "TinyRemoteForCausalLM" and model.config.model_type == "tiny_remote"
    extract_activations(model, tok, documents, tmp_path / "ok.h5", seq_len=16, max_tokens=128, progress=False)
    scaled = _remote_code_model(tmp_path / "scaled", tokenizer_folder, 2.0)
    model, tok, _ = load_model(str(scaled), progress=False, **parts)
    with pytest.raises(NJTCError, match="does not reproduce the model's logits"):
        extract_activations(model, tok, documents, tmp_path / "bad.h5", seq_len=16, max_tokens=128, progress=False)


def test_a_live_fit_and_the_lens_on_opt_with_project_out(tmp_path, tokenizer_folder, documents):
    """The residual stream is wider than the unembedding's input here (project_out folded into the
    head): a live fit and the lens both work at the residual stream's width."""
    from njtc_solve.solve.fit import fit_shortcuts
    from njtc_solve.evaluation.lens import ShortcutLens
    from njtc_solve.data.live import LiveSource

    model, tok, name = load_model(str(build_family("opt-project-out", tmp_path / "opt", tokenizer_folder)),
                                  progress=False)
    live = LiveSource(model, tok, documents, seq_len=16, max_tokens=640, model_name=name)
    assert live.d_model == model.config.hidden_size == 32 != model.get_output_embeddings().weight.shape[1]
    [sc] = fit_shortcuts(live, method="njtc", ranks=[2], progress=False)
    lens = ShortcutLens.from_model(model, sc, tok)
    traj = lens.trajectory("The for statement")
    assert traj.kl.shape[2] == model.config.num_hidden_layers + 1


@pytest.mark.parametrize("family", ["gpt_neo", "gptj", "bloom", "opt"])
def test_tuned_lens_loads_exported_maps_of_the_families_it_knows(family, tmp_path, tokenizer_folder):
    """The families whose final norm tuned-lens 0.2.0 finds: its logits through our exported
    translators equal our lens's."""
    from tuned_lens.nn.lenses import TunedLens

    from njtc_solve.data.capture import capture_residual_stream
    from njtc_solve.maps.tuned_lens import export_tuned_lens
    from njtc_solve.evaluation.lens import ShortcutLens
    from njtc_solve.core.models import model_sha256
    from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts

    model, tok, _ = load_model(str(build_family(family, tmp_path / family, tokenizer_folder)), progress=False)
    head, n = Head.from_model(model), model.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    maps = {l: ShortcutMap(weight=torch.eye(head.d_model) + 0.3 * torch.randn(head.d_model, head.d_model, generator=g),
                           bias=0.1 * torch.randn(head.d_model, generator=g)) for l in range(n)}
    sc = Shortcuts("jtc", maps, n, model_sha256=model_sha256(model))
    tuned = TunedLens.from_model_and_pretrained(model, str(export_tuned_lens(sc, tmp_path / "lens", model=model)))
    ours = ShortcutLens.from_model(model, sc)
    with capture_residual_stream(model) as hidden, torch.no_grad():
        model(input_ids=torch.tensor([tok("The lens reads every layer.")["input_ids"]]))
        for layer in range(n):
            torch.testing.assert_close(tuned(hidden[layer][0], layer), ours(hidden[layer][0], layer), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["opt-project-out", "gemma2", "granite"])
def test_export_refuses_maps_for_a_head_tuned_lens_cannot_apply(family, tmp_path, tokenizer_folder):
    """Without the model at hand the recorded head still tells: a projection, soft-cap or scale."""
    from njtc_solve.core.errors import NJTCError
    from njtc_solve.maps.tuned_lens import export_tuned_lens
    from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts

    model, _, _ = load_model(str(build_family(family, tmp_path / family, tokenizer_folder)), progress=False)
    head = Head.from_model(model)
    sc = Shortcuts("jtc", {0: ShortcutMap(weight=torch.eye(head.d_model), bias=torch.zeros(head.d_model))},
                   model.config.num_hidden_layers, model_sha256="x" * 64)
    sc.head_description, sc.head_sha256 = head.describe(), head.fingerprint()
    with pytest.raises(NJTCError, match="leaves out"):
        export_tuned_lens(sc, tmp_path / "lens")
    assert not (tmp_path / "lens").exists()
