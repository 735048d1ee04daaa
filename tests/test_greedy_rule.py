"""Identity by rule: speculative decoding refuses every generation setting under which
``model.generate(do_sample=False)`` is not the plain argmax, judged by the logits processors
transformers itself builds from the config, and accepts (with identical output) what greedy
decoding ignores (the sampling warpers)."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from njtc_solve.core.errors import NJTCError
from njtc_solve.infer.speculative import ShortcutDrafter, _greedy_processors, check_greedy_config, speculative_generate

from conftest import sharpened_model

VOCAB, EOS = 120, 7

# every logits processor _get_logits_processor builds from a generation config, and a setting that builds it
PROCESSORS = {
    "UnbatchedClassifierFreeGuidanceLogitsProcessor": {"guidance_scale": 1.5},
    "SequenceBiasLogitsProcessor": {"sequence_bias": {(5,): 2.0}},
    "RepetitionPenaltyLogitsProcessor": {"repetition_penalty": 1.3},
    "NoRepeatNGramLogitsProcessor": {"no_repeat_ngram_size": 2},
    "NoBadWordsLogitsProcessor": {"bad_words_ids": [[5]]},
    "MinLengthLogitsProcessor": {"min_length": 5},
    "MinNewTokensLengthLogitsProcessor": {"min_new_tokens": 3},
    "ForcedBOSTokenLogitsProcessor": {"forced_bos_token_id": 1},
    "ForcedEOSTokenLogitsProcessor": {"forced_eos_token_id": 2},
    "InfNanRemoveLogitsProcessor": {"remove_invalid_values": True},
    "ExponentialDecayLengthPenalty": {"exponential_decay_length_penalty": (2, 1.5)},
    "SuppressTokensLogitsProcessor": {"suppress_tokens": [5]},
    "SuppressTokensAtBeginLogitsProcessor": {"begin_suppress_tokens": [5]},
    "LogitNormalization": {"renormalize_logits": True},
    # generate passes a decoder-only model's prompt as its encoder_input_ids: these act on it too
    "EncoderRepetitionPenaltyLogitsProcessor": {"encoder_repetition_penalty": 3.0},
    "EncoderNoRepeatNGramLogitsProcessor": {"encoder_no_repeat_ngram_size": 2},
}
# the warpers, which generate applies only when sampling: greedy decoding is the argmax with them set
WARPERS = {"TemperatureLogitsWarper": {"temperature": 0.5}, "TopKLogitsWarper": {"top_k": 3},
           "TopPLogitsWarper": {"top_p": 0.5}, "MinPLogitsWarper": {"min_p": 0.2},
           "TypicalLogitsWarper": {"typical_p": 0.5}, "EpsilonLogitsWarper": {"epsilon_cutoff": 0.1},
           "EtaLogitsWarper": {"eta_cutoff": 0.1}, "TopHLogitsWarper": {"top_h": 0.5}}
# built from generate's arguments, never from a config
NOT_FROM_CONFIG = {"PrefixConstrainedLogitsProcessor"}


@pytest.fixture(scope="module")
def model():
    import transformers as T

    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config.bos_token_id = config.pad_token_id = None
    config.eos_token_id = EOS
    model = sharpened_model(config)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = 0
    return model


def _configured(model, settings: dict):
    import copy

    configured = copy.deepcopy(model)
    for name, value in settings.items():
        setattr(configured.generation_config, name, value)
    return configured


def test_the_cases_cover_every_processor_transformers_builds_from_a_config(model):
    """Read the class names out of transformers' own _get_logits_processor: a new one fails here."""
    from transformers.generation.utils import GenerationMixin

    source = inspect.getsource(GenerationMixin._get_logits_processor)
    named = set(re.findall(r"\b([A-Z]\w*(?:LogitsProcessor|LogitsWarper|LengthPenalty|Normalization))\(", source))
    assert named, "the source changed shape: read it again"
    assert named - NOT_FROM_CONFIG - set(PROCESSORS) - set(WARPERS) == set()
    assert "watermarking_config" in source  # its processor comes from the config object (below)
    for name, settings in PROCESSORS.items():  # each setting builds the processor it is listed under
        assert name in _greedy_processors(model, _configured(model, settings).generation_config), name


@pytest.mark.parametrize("name", [*PROCESSORS, "watermarking"])
def test_every_processor_is_refused(model, name):
    if name == "watermarking":
        from transformers import WatermarkingConfig

        settings = {"watermarking_config": WatermarkingConfig()}
    else:
        settings = PROCESSORS[name]
    configured = _configured(model, settings)
    setting = next(iter(settings))
    with pytest.raises(NJTCError, match=f"sets {setting}="):
        check_greedy_config(configured)
    with pytest.raises(NJTCError, match="not the plain argmax"):
        speculative_generate(configured, torch.tensor([[5, 17, 42, 8]]), drafter=ShortcutDrafter(configured, None, 1),
                             max_new_tokens=4, draft_tokens=2)


@pytest.mark.parametrize("name", list(WARPERS))
def test_sampling_warpers_leave_greedy_decoding_identical(model, name):
    configured = _configured(model, WARPERS[name])
    assert check_greedy_config(configured) == [EOS]
    prompt = torch.tensor([[5, 17, 42, 8]])
    ours = speculative_generate(configured, prompt, drafter=ShortcutDrafter(configured, None, 1), max_new_tokens=6,
                                draft_tokens=2)
    theirs = configured.generate(prompt, do_sample=False, max_new_tokens=6)
    tokens = ours.sequences if hasattr(ours, "sequences") else ours
    assert torch.equal(torch.as_tensor(tokens), theirs)
